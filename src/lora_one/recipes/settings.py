"""The settings of a run, as data: one dataclass per command, each field with its default and help.

The command line builds its flags from these fields (`lora_one.cli.args`), a `--config` YAML file
fills them by name, and Python callers construct them directly:

    run_finetune(FinetuneSettings(model="smollm2-135m", data="trec", out="runs/x", max_steps=40))

`check()` refuses bad values before anything is loaded, with one line naming the problem and the fix.
The init's settings are the library's `LoraOneConfig` fields under the same names: `InitSettings` builds
one (`lora_one_config()`), whose own checks are the only ones they get. This module imports no
implementation, only the constants and the config (`tests/test_layers.py`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field

from lora_one.core.config import CONFIG_FIELDS, LoraOneConfig, gamma_grid
from lora_one.core.constants import DEFAULT_PREC_REG, DEFAULT_SKETCH_PASSES, GRAD_MODES, SVDS, VARIANTS
from lora_one.core.errors import UsageError
from lora_one.recipes.constants import DTYPE_NAMES, FORMATS, QUANTIZATIONS, TASKS, TOO_LONG, Fields

SCHEDULES = ("linear", "cosine", "constant", "constant_with_warmup")
REPORT_TO = ("none", "tensorboard", "wandb")
HEAD_INITS = ("random", "probe")
LIBRARY = LoraOneConfig()  # the init's defaults, the flags' too


def setting(default, help: str, choices=None, flag: str | None = None, parse=None):
    """A field with its help text (and choices, a flag name other than `--field-name`, and a parser of
    its text when its type is not one argparse knows, e.g. `--gamma auto`)."""
    return field(default=default, metadata={"help": help, "choices": choices, "flag": flag, "parse": parse})


def required(help: str):
    return field(metadata={"help": help, "required": True})


def parse_gamma(text: str) -> float | str | tuple[float, ...]:
    """A `--gamma` value: a number, `auto`, or numbers separated by commas (a grid to search)."""
    text = text.strip()
    if text == "auto":
        return text
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise UsageError(f"--gamma {text!r}: give a positive number, auto, or numbers separated by commas "
                         "(e.g. 32,64,128,256).") from None
    return values[0] if len(values) == 1 else values


def sharded_launch() -> bool:
    """Whether `accelerate launch` was told to shard the model (FSDP or DeepSpeed). The init runs
    before the Trainer shards anything, on the whole model in each process: in sketch mode, which
    needs no weight gradient, its memory stays near that of the weights."""
    return any(os.environ.get(var, "").lower() == "true" for var in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"))


@dataclass(kw_only=True)
class DataSettings:
    """Model and data (`init`, `finetune` and `eval`)."""

    model: str = required("alias (smollm2-135m, minilm-l6), a local HF folder, a .gguf file (converted once into the "
                          "cache) or a Hub id owner/name (online, or in the Hugging Face cache)")
    data: str = required("training data: a .jsonl, .json, .csv/.tsv (UTF-8) or .parquet file, a Hub data set "
                         "hub:NAME[:CONFIG][@SPLIT] (online), or an embedded set (trec, sentiment, unicode, "
                         "dialog)")
    task: str | None = setting(None, "default: causal-lm for *ForCausalLM models, seq2seq for "
                               "*ForConditionalGeneration encoder-decoders (T5, BART), else classification", TASKS)
    format: str | None = setting(None, "record format (default: detected from the fields): prompt-response (or TRL's "
                                 "prompt/completion), messages (a chat, the loss on the assistant turns), text (plain "
                                 "language modelling), text-label (classification)", FORMATS)
    max_length: int | None = setting(None, "tokens per example (default: 256, or the model's positions if fewer)")
    too_long: str = setting("truncate", "a longer record: truncate (a causal-LM prompt or conversation: its start; a "
                            "seq2seq prompt or response, a plain or classification text: its end), skip, or error; the "
                            "count is printed", TOO_LONG)
    device: str = setting("auto", "auto, cpu, cuda, cuda:1, mps")
    dtype: str = setting("float32", "dtype of the model's weights (the one-step gradient is summed in float32 "
                         "whatever it is)", DTYPE_NAMES)
    quantize: str | None = setting(None, "quantise the base's linear layers with bitsandbytes (QLoRA): 4bit (NF4) or "
                                   "8bit; the init runs in sketch mode, the adapter loads on the unquantised base",
                                   QUANTIZATIONS)
    prompt_field: str = setting("prompt", "field of the prompt (prompt-response)")
    response_field: str = setting("response", "field of the response (prompt-response; records with TRL's "
                                  "'completion' need no flag)")
    text_field: str = setting("text", "field of the text (text, text-label)")
    label_field: str = setting("label", "field of the label (text-label)")
    messages_field: str = setting("messages", "field of the conversation, a list of {role, content} (messages)")
    chat_template: bool = setting(False, "wrap prompts in the tokenizer's chat template")

    @property
    def fields(self) -> Fields:
        return Fields(self.prompt_field, self.response_field, self.text_field, self.label_field, self.messages_field,
                      self.format)

    def check(self) -> None:
        """The device is checked against the machine when the run fills in its defaults
        (`lora_one.recipes.runs.complete_model_settings`)."""
        if self.max_length is not None and self.max_length < 2:
            raise UsageError(f"--max-length must be >= 2, got {self.max_length}.")


@dataclass(kw_only=True)
class GenerationSettings:
    """Exact match (`finetune` and `eval` on open-ended prompt-response data)."""

    generate_samples: int = setting(200, "exact match by greedy generation on a fixed random sample of at most this "
                                    "many held-out records, a generation each (0: all); the loss is on all")
    max_new_tokens: int = setting(64, "cap on the tokens of each generation (the longest reference response, if "
                                  "shorter)")

    def generation_problems(self) -> list[str]:
        problems = []
        if self.generate_samples < 0:
            problems.append(f"--generate-samples must be >= 0 (0: all), got {self.generate_samples}")
        if self.max_new_tokens < 1:
            problems.append(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        return problems


@dataclass(kw_only=True)
class InitSettings(DataSettings):
    """Adapter and init (`init` and `finetune`)."""

    variant: str = setting(LIBRARY.variant, "adapter init", VARIANTS)
    rank: int = setting(8, "LoRA rank r")
    alpha: float = setting(16.0, "LoRA alpha")
    rslora: bool = setting(True, "scale alpha/r instead of alpha/sqrt(r)", flag="--no-rslora")
    dora: bool = setting(False, "DoRA adapters; with lora-one or spectral the magnitude starts at the norms of W + sBA "
                         "(DoRA-One)")
    gamma: float | str | tuple[float, ...] = setting(
        LIBRARY.gamma, "init step: a number (the step-0 update is -G_r / (gamma sigma_1)), 'auto' (the lowest step-0 "
        "loss over 8, 16, ..., 8192 on --init-samples held-out training examples; lora-one and spectral), or "
        "comma-separated values to search, e.g. 64,128,256", parse=parse_gamma)
    init_samples: int = setting(LIBRARY.init_samples, "training examples of the one-step gradient")
    init_batch_size: int = setting(1, "micro-batch size of the gradient pass (the gradient does not depend on it)")
    target: str = setting("all-linear", "'all-linear' or comma-separated module names")
    svd: str = setting(LIBRARY.svd, "top-r SVD of each gradient", SVDS)
    grad_mode: str | None = setting(None, "memory mode of the gradient phase (sketch: no full gradient is ever "
                                    "formed); default: accumulate, or sketch for a quantised base or when accelerate "
                                    "shards the model (FSDP, DeepSpeed)", GRAD_MODES)
    offload: bool = setting(LIBRARY.offload, "keep accumulate mode's fp32 accumulators on CPU")
    sketch_passes: int | None = setting(
        LIBRARY.sketch_passes, f"passes over the init data in sketch mode (default {DEFAULT_SKETCH_PASSES}); more "
        "passes, a more accurate top-r SVD (docs/scaling.md#memory-modes)")
    seed: int = setting(LIBRARY.seed, "seed of the init samples, the SVD and the training data order")
    grad_cache: str | None = setting(
        LIBRARY.grad_cache, "folder of one-step gradients: a run whose model, init samples and gradient settings "
        "match an earlier one reads its gradient from there and skips the backward; otherwise it is computed and "
        "stored (accumulate: G, 4 bytes per target weight; sketch, single-batch: the top-r SVD)")
    base_model_name: str | None = setting(None, "base model named in the saved adapter_config.json, e.g. a Hub id "
                                          "(default: an alias's Hub id, else the --model folder)")
    out: str = required("output folder")
    overwrite: bool = setting(False, "replace the run (finetune) or our files (init) in --out")

    @property
    def target_modules(self):
        return self.target if self.target == "all-linear" else [t.strip() for t in self.target.split(",") if t.strip()]

    def lora_one_config(self) -> LoraOneConfig:
        """The init's settings as the library takes them, checked by `LoraOneConfig`; a `grad_mode` left to
        its default is the one the run takes: sketch for a quantised base or a sharded launch, else
        accumulate."""
        values = {name: getattr(self, name) for name in CONFIG_FIELDS}
        if self.grad_mode is None:
            values["grad_mode"] = "sketch" if self.quantize or sharded_launch() else "accumulate"
        return LoraOneConfig(**values)

    def check(self) -> None:
        super().check()
        problems = []
        if self.rank < 1:
            problems.append(f"--rank must be >= 1, got {self.rank}")
        if not self.alpha > 0:
            problems.append(f"--alpha must be > 0, got {self.alpha} (a negative scale would step up the gradient)")
        if self.init_batch_size < 1:
            problems.append(f"--init-batch-size must be >= 1, got {self.init_batch_size}")
        if not self.target.replace(",", "").strip():
            problems.append(f"--target {self.target!r} names no module; give all-linear or comma-separated module "
                            "names")
        if problems:
            raise UsageError("; ".join(problems) + ".")
        self.lora_one_config()  # the init's settings, checked by the library

    @property
    def gamma_search(self) -> bool:
        return gamma_grid(self.gamma, self.variant) is not None


@dataclass(kw_only=True)
class FinetuneSettings(InitSettings, GenerationSettings):
    """Training, evaluation and output (`finetune`: training with `transformers.Trainer`)."""

    precondition: bool = setting(False, "Riemannian (scaled) AdamW")
    prec_reg: float = setting(DEFAULT_PREC_REG, "damping of the preconditioner")
    lora_plus_ratio: float = setting(1.0, "LoRA+: lr of lora_B = ratio * lr")
    head_init: str = setting("random", "classification head: keep the fresh random head, or fit a linear probe on "
                             "frozen features before the init (docs/demo.md says what each gave)", HEAD_INITS)
    probe_samples: int = setting(2000, "training examples for the linear probe")
    probe_l2: float = setting(1e-4, "L2 penalty of the linear probe")
    lr: float = setting(2e-4, "learning rate")
    schedule: str = setting("linear", "learning-rate schedule", SCHEDULES)
    warmup_steps: int = setting(0, "warm-up steps; overrides --warmup-ratio when > 0")
    warmup_ratio: float = setting(0.03, "warm-up as a fraction of the steps")
    weight_decay: float = setting(0.0, "AdamW weight decay")
    batch_size: int = setting(8, "examples per micro-batch, over all processes")
    grad_accum: int = setting(1, "micro-batches per optimizer step")
    epochs: float = setting(1.0, "passes over the training data")
    max_steps: int = setting(0, "optimizer steps; overrides --epochs when > 0")
    max_grad_norm: float = setting(1.0, "gradient clipping; 0 disables it")
    bf16: bool = setting(False, "bfloat16 mixed precision")
    fp16: bool = setting(False, "float16 mixed precision (CUDA only)")
    gradient_checkpointing: bool = setting(False, "recompute activations in the backward pass: less memory, slower")
    report_to: str = setting("none", "also log to TensorBoard (in OUT/runs) or Weights & Biases", REPORT_TO)
    push_to_hub: bool = setting(False, "upload the finished adapter to the Hugging Face Hub (online, logged in)")
    hub_model_id: str | None = setting(None, "Hub repository for --push-to-hub (default: the --out folder's name)")
    eval_data: str | None = setting(None, "held-out data (default for embedded data: its :val split)")
    eval_split: float | None = setting(None, "hold out this fraction of --data instead")
    choices: str | None = setting(None, "comma-separated closed label set of prompt-response records (default: "
                                  "inferred)")
    eval_every: int = setting(0, "steps between evaluations (0: step 0 and the end only)")
    eval_batch_size: int = setting(16, "examples per evaluation batch")
    save_every: int = setting(100, "steps between checkpoints (0: none but on interruption)")
    resume: bool = setting(False, "continue the run in --out from its last checkpoint")
    quiet: bool = setting(False, "no progress bars")

    def check(self) -> None:
        super().check()
        problems = self.generation_problems()
        if not 0 < self.lr < 1:
            problems.append(f"--lr (the learning rate) must lie in (0, 1), got {self.lr}")
        for name in ("batch_size", "grad_accum", "eval_batch_size", "probe_samples"):
            if getattr(self, name) < 1:
                problems.append(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "max_steps", "eval_every", "save_every"):
            if getattr(self, name) < 0:
                problems.append(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.max_steps == 0 and not self.epochs > 0:
            problems.append(f"--epochs must be > 0 (or give --max-steps), got {self.epochs}")
        if self.max_steps and self.warmup_steps >= self.max_steps:
            problems.append(f"{self.warmup_steps} warm-up steps leave nothing of the {self.max_steps} training steps")
        if not 0 <= self.warmup_ratio < 1:
            problems.append(f"--warmup-ratio must lie in [0, 1), got {self.warmup_ratio}")
        for name in ("weight_decay", "max_grad_norm", "prec_reg", "probe_l2"):
            if not getattr(self, name) >= 0:
                problems.append(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if not self.lora_plus_ratio > 0:
            problems.append(f"--lora-plus-ratio must be > 0, got {self.lora_plus_ratio}")
        if self.bf16 and self.fp16:
            problems.append("give --bf16 or --fp16, not both")
        if self.eval_split is not None and not 0 < self.eval_split < 1:
            problems.append(f"--eval-split must lie in (0, 1), got {self.eval_split}")
        if self.eval_split is not None and self.eval_data:
            problems.append("give --eval-data or --eval-split, not both")
        if self.resume and self.overwrite:
            problems.append("--resume continues the run in --out, --overwrite replaces it: choose one")
        if problems:
            raise UsageError("; ".join(problems) + ".")


@dataclass(kw_only=True)
class EvalSettings(DataSettings, GenerationSettings):
    """Evaluation (`eval`: a base model, with an adapter or without, on held-out data)."""

    adapter: str | None = setting(None, "adapter folder (from finetune); without it, the base model is evaluated")
    choices: str | None = setting(None, "comma-separated closed label set of prompt-response records (default: the "
                                  "run's, or inferred from the responses)")
    batch_size: int = setting(16, "examples per batch")
    out: str | None = setting(None, "JSON file for the results (default: ADAPTER/eval.json, or print only)")

    def check(self) -> None:
        super().check()
        problems = self.generation_problems()
        if self.batch_size < 1:
            problems.append(f"--batch-size must be >= 1, got {self.batch_size}")
        if problems:
            raise UsageError("; ".join(problems) + ".")


def as_dict(settings) -> dict:
    """The settings as `args.json` records them (and `--config` reads them back): in JSON form (a tuple
    is a list), so that a saved run's settings compare equal to the same settings now."""
    return json.loads(json.dumps(dataclasses.asdict(settings)))


def inert(settings: dict) -> set[str]:
    """The settings of `as_dict` that act on nothing given the others, so two runs may differ in them
    (a default that changed between versions does not make a finished run another run)."""
    return set() if settings.get("precondition") else {"prec_reg"}
