"""`lora-one finetune` as a recipe: data -> (linear probe) -> LoRA-One init -> `transformers.Trainer`.

Output folder: the stock PEFT adapter with its `lora_one.json` sidecar, `args.json` (every setting;
it loads back with `--config`), `metrics.jsonl`, `loss.png`, `lora_one_step0.safetensors` (the step-0
adapter, so that `--resume` needs no gradient pass) and the Trainer's `checkpoint-N/` folders.

The init runs before the Trainer is built, with the library's `get_lora_one_model` on init samples
drawn by the seed alone (not by the number of processes), so every variant works, including those
that rewrite the base weights, and `--resume` rebuilds the step-0 model from the saved file. The
Trainer then does what it does for any PEFT model: the loop, gradient accumulation weighted by the
loss terms of the whole step (`num_items_in_batch`), DDP under `torchrun` / `accelerate launch`,
mixed precision, gradient checkpointing, checkpoints and their exact resume, reporting.

`--batch-size` is the batch of one micro-step over all processes (each takes `batch_size / N`), so
the steps and the data order do not depend on the number of processes. Every process evaluates
(the same numbers; nobody waits in a collective meanwhile); the main process writes the files.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pickle
import random
import signal
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed
from transformers.integrations.integration_utils import TensorBoardCallback, default_logdir
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from transformers.trainer_pt_utils import safe_globals
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from lora_one.core.errors import UsageError
from lora_one.core.files import ADAPTER, check_out_folder, check_writable, remove_ours, replacing, write_text_atomic
from lora_one.core.init import get_lora_one_model, lora_one_state, restore_lora_one
from lora_one.core.optim import create_optimizer
from lora_one.core.parallel import all_reduce_sum, is_main_process, process_index
from lora_one.core.save import SIDECAR, save_adapter
from lora_one.recipes import embedded_data
from lora_one.recipes.data import collate, init_batches, init_sample_indices, read_records
from lora_one.recipes.evaluate import choices_of, make_evaluator
from lora_one.recipes.hub import check_hub_access, push_adapter
from lora_one.recipes.models import CLASSIFICATION, SEQ2SEQ, infer_task, resolve_model_path
from lora_one.recipes.plots import plot_loss
from lora_one.recipes.probe import probe_head
from lora_one.recipes.runs import (
    base_model_name_of,
    complete_model_settings,
    gamma_line,
    load_task_data,
    lora_config_of,
)
from lora_one.recipes.settings import FinetuneSettings, as_dict, inert

ARGS = "args.json"
METRICS = "metrics.jsonl"
STEP0 = "lora_one_step0.safetensors"
# Settings that may change between a run and its --resume without changing the result.
RESUME_FREE = ("resume", "overwrite", "save_every", "quiet", "eval_batch_size", "device", "offload",
               "base_model_name", "report_to", "push_to_hub", "hub_model_id", "grad_cache")
# What a Trainer checkpoint folder holds (rng_state_N.pth: one per process).
CHECKPOINT_FILES = ("adapter_config.json", "adapter_model.safetensors", "README.md", "optimizer.pt", "scheduler.pt",
                    "scaler.pt", "rng_state*.pth", TRAINER_STATE_NAME, "training_args.bin", SIDECAR)
# The files of a run in its folder, which --overwrite deletes (and nothing else), the adapter's marker
# first so the folder never looks like a finished run; a README.md is left alone (it may be the user's).
RUN_FILES = (ADAPTER.marker, *ADAPTER.stale, SIDECAR, ARGS, METRICS, "loss.png", "eval.json", STEP0,
             *(f"{PREFIX_CHECKPOINT_DIR}-*/{name}" for name in CHECKPOINT_FILES))


class TrainingInterrupted(Exception):
    def __init__(self, step: int, checkpoint: Path):
        super().__init__(f"interrupted after step {step}; checkpoint {checkpoint}")
        self.step, self.checkpoint = step, checkpoint


# ---------------------------------------------------------------- settings and the output folder


def total_steps(s: FinetuneSettings, n_examples: int) -> int:
    if s.max_steps:
        return s.max_steps
    per_epoch = math.ceil(n_examples / (s.batch_size * s.grad_accum))
    return max(1, math.ceil(s.epochs * per_epoch))


def warmup_steps(s: FinetuneSettings, total: int) -> int:
    n = s.warmup_steps or round(s.warmup_ratio * total)
    if n >= total:
        raise UsageError(f"{n} warm-up steps leave nothing of the {total} training steps; lower the warm-up.")
    return n


def _complete_defaults(s: FinetuneSettings) -> None:
    """Fill the settings whose default depends on the model or data, so args.json records them."""
    s.task = s.task or infer_task(resolve_model_path(s.model))
    if not s.eval_data and s.eval_split is None and embedded_data.is_embedded(s.data):
        name, _, split = s.data.partition(":")
        if split in ("", "train"):
            s.eval_data = f"{name}:val"
    complete_model_settings(s)


def step_of(checkpoint: Path | None) -> int:
    return int(checkpoint.name.rsplit("-", 1)[1]) if checkpoint else 0


def completed_checkpoint(out: Path) -> Path | None:
    """The newest checkpoint the Trainer finished writing (its trainer_state.json comes last)."""
    done = [p for p in out.glob(f"{PREFIX_CHECKPOINT_DIR}-*") if (p / TRAINER_STATE_NAME).is_file()]
    return max(done, key=step_of, default=None)


def _check_out_dir(out: Path, s: FinetuneSettings) -> None:
    """Refuse an --out that holds something, unless --overwrite, or --resume of the same run."""
    check_out_folder(out)
    # The Trainer removes older checkpoint folders whole (save_total_limit): they must hold nothing else.
    foreign = [p for p in sorted(out.glob(f"{PREFIX_CHECKPOINT_DIR}-*/*"))
               if not any(p.match(name) for name in CHECKPOINT_FILES)]
    if foreign:
        raise UsageError(f"{foreign[0]} is not a file of the run's checkpoints, whose folders the Trainer deletes "
                         "whole; move it out of the run folder first.")
    if s.resume:
        if not (out / ARGS).is_file():
            raise UsageError(f"--resume: {str(out)!r} holds no run (no {ARGS}); start it without --resume.")
        saved, current = json.loads((out / ARGS).read_text()), as_dict(s)
        differ = [f"{k} {saved.get(k)!r} there, {current.get(k)!r} now"
                  for k in sorted(set(saved) | set(current))
                  if k not in (*RESUME_FREE, *inert(current)) and saved.get(k) != current.get(k)]
        if differ:
            raise UsageError(f"--resume: {str(out)!r} is a run with other settings: {'; '.join(differ)}.")
        if completed_checkpoint(out) is None or not (out / STEP0).is_file():
            raise UsageError(f"--resume: {str(out)!r} has no checkpoint yet; start again with --overwrite.")
        return
    if out.exists() and any(out.iterdir()):
        if not s.overwrite:
            raise UsageError(f"--out {str(out)!r} exists and is not empty; pass --resume to continue its run, "
                             "--overwrite to replace it, or choose another folder.")
        if not (out / ARGS).is_file():  # --overwrite deletes a run's files by name, never a user's namesakes
            raise UsageError(f"--overwrite: {str(out)!r} holds files but no lora-one run (no {ARGS}), so nothing "
                             "in it is ours to replace; choose a new or empty folder.")


def _check_checkpoint(ckpt: Path) -> None:
    """Read the checkpoint as the Trainer will (tensors and plain containers only) so that a damaged
    or foreign one is one error line here, not a traceback from inside the Trainer."""
    try:
        json.loads((ckpt / TRAINER_STATE_NAME).read_text())
        with safe_open(ckpt / "adapter_model.safetensors", "pt"):
            pass
        with safe_globals():
            for path in ckpt.glob("*.p*"):
                if path.suffix in (".pt", ".pth"):
                    torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UsageError(f"Checkpoint {ckpt} holds more than tensors and plain containers, so it is not loaded (it "
                         "could run code); resume only checkpoints lora-one wrote.") from None
    except Exception as e:  # noqa: BLE001 (a truncated or foreign file: the same to the user, whatever failed)
        raise UsageError(f"Checkpoint {ckpt} cannot be read ({type(e).__name__}); it is damaged: start again with "
                         "--overwrite.") from None


def _save_step0(path: Path, state: dict) -> None:
    with replacing(path) as tmp:
        save_file({k: v.contiguous() for k, v in state["parameters"].items()}, tmp,
                  metadata={"adapter": state["adapter"], "lora_one": json.dumps(state["metadata"])})


def _load_step0(path: Path) -> dict:
    with safe_open(path, "pt") as f:
        header = f.metadata()
    return {"adapter": header["adapter"], "parameters": load_file(path), "metadata": json.loads(header["lora_one"])}


def _split(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    idx = list(range(n))
    random.Random(seed).shuffle(idx)
    n_eval = round(fraction * n)
    if not 0 < n_eval < n:
        raise UsageError(f"--eval-split {fraction} of {n} records leaves an empty part; change it.")
    return sorted(idx[n_eval:]), sorted(idx[:n_eval])


# ---------------------------------------------------------------- the Trainer and its callbacks


class _Trainer(Trainer):
    """A Trainer whose evaluation is ours: closed-label log-likelihood accuracy, exact match or
    classification accuracy, and the loss, on the held-out records."""

    def __init__(self, *args, evaluator=None, settings: FinetuneSettings, **kwargs):
        super().__init__(*args, **kwargs)
        self.evaluator, self.settings = evaluator, settings
        self.eval_seconds = 0.0

    def create_optimizer(self, model=None):
        """Ours (AdamW, preconditioned or not, LoRA+), built where the Trainer builds its own: after
        the model is prepared, so that it also works when the launch shards the model."""
        if self.optimizer is None:
            s = self.settings
            if s.precondition and (self.is_fsdp_enabled or self.is_deepspeed_enabled):
                raise UsageError("--precondition needs whole LoRA factors on every process, which FSDP and DeepSpeed "
                                 "shard; drop --precondition or launch without sharding (DDP).")
            self.optimizer = create_optimizer(self.model, s.lr, precondition=s.precondition, prec_reg=s.prec_reg,
                                              weight_decay=s.weight_decay, lora_plus_ratio=s.lora_plus_ratio)
        return self.optimizer

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict:
        if self.evaluator is None:
            return {}
        t = time.perf_counter()
        model = self.model
        was_training = model.training
        model.eval()
        with torch.no_grad(), self.accelerator.autocast():
            results = self.evaluator(model)
        model.train(was_training)
        self.eval_seconds += time.perf_counter() - t
        metrics = {f"{metric_key_prefix}_{k}": v for k, v in results.items()}
        self.log_metrics_at_step(metrics)
        return metrics

    def log_metrics_at_step(self, metrics: dict) -> None:
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)


def _class_loss(outputs, labels, num_items_in_batch=None):
    """Sequence classification's loss as a sum over the micro-batch divided by the examples of the
    whole step (the Trainer counts them over the accumulated micro-batches and the processes), so a
    short micro-batch weighs by its examples, as in the one-step gradient of the init."""
    loss = F.cross_entropy(outputs.logits.float(), labels, reduction="sum")
    return loss / (num_items_in_batch if num_items_in_batch is not None else labels.numel())


def _decoder_loss(outputs, labels, num_items_in_batch=None):
    """An encoder-decoder's token loss summed over the micro-batch and divided by the label tokens of the
    whole step: T5's and BART's own loss is their micro-batch's mean whatever `num_items_in_batch` says,
    which the Trainer would take as already weighted (2 accumulated micro-batches: a twice too large step)."""
    loss = F.cross_entropy(outputs.logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
    return loss / (num_items_in_batch if num_items_in_batch is not None else (labels != -100).sum())


class RunLog(TrainerCallback):
    """`metrics.jsonl` (one JSON line per step and per evaluation, flushed at once; cut back to the
    checkpoint's step on resume), the progress bar, the evaluation schedule (every `eval_every`
    steps and at the end) and the time spent in training steps alone."""

    def __init__(self, path: Path | None, eval_every: int, has_eval: bool, progress: bool, keep_until: int | None):
        self.path, self.eval_every, self.has_eval, self.progress = path, eval_every, has_eval, progress
        self.entries: list[dict] = []
        self.train_seconds = 0.0
        self._t = None
        self._bar = None
        if path is not None:
            if keep_until is not None and path.exists():
                with path.open(encoding="utf-8") as f:
                    self.entries = [e for e in map(json.loads, filter(str.strip, f)) if e["step"] <= keep_until]
            write_text_atomic(path, "".join(json.dumps(e) + "\n" for e in self.entries))

    def _write(self, entry: dict) -> None:
        self.entries.append(entry)
        if self.path is not None:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(entry) + "\n")

    def on_train_begin(self, args, state, control, **kwargs):
        self._bar = tqdm(total=state.max_steps, initial=state.global_step, desc="training", unit="step",
                         disable=not (self.progress and state.is_world_process_zero), dynamic_ncols=True)

    def on_step_begin(self, args, state, control, **kwargs):
        self._t = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.train_seconds += time.perf_counter() - self._t
        step = state.global_step
        if self.has_eval and (step == state.max_steps or (self.eval_every and step % self.eval_every == 0)):
            control.should_evaluate = True

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        evals = {k: v for k, v in logs.items() if k.startswith("eval_")}
        if evals:
            self._write({"step": state.global_step, **evals})
        elif "loss" in logs:
            entry = {"step": state.global_step, "train_loss": logs["loss"], "lr": logs.get("learning_rate"),
                     "grad_norm": logs.get("grad_norm")}
            self._write(entry)
            if self._bar is not None:
                self._bar.update(state.global_step - self._bar.n)
                self._bar.set_postfix(loss=f"{entry['train_loss']:.4f}", lr=f"{entry['lr']:.2e}")

    def on_train_end(self, args, state, control, **kwargs):
        if self._bar is not None:
            self._bar.close()


class StopOnSignal(TrainerCallback):
    """The first SIGINT/SIGTERM asks every process to stop after the step in progress, with a
    checkpoint; a second one interrupts at once."""

    def __init__(self):
        self.requested = False
        self.stopped_at: int | None = None

    def on_step_end(self, args, state, control, **kwargs):
        flag = torch.tensor([float(self.requested)], device=args.device)
        if all_reduce_sum(flag).item():  # every process stops at the same step
            control.should_save = control.should_training_stop = True
            self.stopped_at = state.global_step

    @contextmanager
    def installed(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        old = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

        def handler(signum, frame):
            if self.requested:
                raise KeyboardInterrupt
            self.requested = True
            print("\nStopping after the current step (press Ctrl-C again to stop at once) ...", flush=True)

        for sig in old:
            signal.signal(sig, handler)
        try:
            yield
        finally:
            for sig, h in old.items():
                signal.signal(sig, h)


def training_arguments(s: FinetuneSettings, out: Path) -> TrainingArguments:
    """The Trainer's settings for ours, but the steps (they depend on the data). Building them joins
    the launcher's process group, if any."""
    targs = TrainingArguments(
        output_dir=str(out), max_steps=1, gradient_accumulation_steps=s.grad_accum, learning_rate=s.lr,
        lr_scheduler_type=s.schedule, weight_decay=s.weight_decay, max_grad_norm=s.max_grad_norm,
        bf16=s.bf16, fp16=s.fp16, activation_checkpointing=s.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False},  # reentrant would need grads on the inputs
        logging_steps=1, eval_strategy="no", save_strategy="steps" if s.save_every else "no",
        save_steps=s.save_every or 1, save_total_limit=1, report_to=s.report_to, seed=s.seed,
        use_cpu=s.device == "cpu", remove_unused_columns=False, label_names=["labels"],
        dataloader_pin_memory=s.device.startswith("cuda"), disable_tqdm=s.quiet, ddp_find_unused_parameters=False,
    )
    if s.batch_size % targs.world_size:
        raise UsageError(f"--batch-size {s.batch_size} does not split over {targs.world_size} processes; give a "
                         f"multiple of {targs.world_size}.")
    targs.per_device_train_batch_size = s.batch_size // targs.world_size
    return targs


def _check_environment(s: FinetuneSettings) -> None:
    """Refuse, before any work, what the machine cannot do for these settings."""
    import importlib.util

    if s.fp16 and not s.device.startswith("cuda"):
        raise UsageError(f"--fp16 needs a CUDA device, not {s.device}; use --bf16 (or neither).")
    if s.device.startswith("cuda:"):
        raise UsageError(f"--device {s.device}: finetune takes the GPU the Trainer assigns; pass --device cuda and "
                         "choose the GPU with CUDA_VISIBLE_DEVICES.")
    package = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",)}.get(s.report_to, ())
    if package and not any(importlib.util.find_spec(p) for p in package):
        raise UsageError(f"--report-to {s.report_to} needs the {package[0]} package: pip install {package[0]} "
                         "(or --report-to none).")
    if s.push_to_hub:
        check_hub_access()


# ---------------------------------------------------------------- the recipe


@dataclass
class _Data:
    """What the data step loaded: the model and tokenizer, the training features, the evaluation."""

    model: torch.nn.Module
    tokenizer: object
    task: str
    features: list[dict]
    label2id: dict | None
    choices: list[str] | None
    evaluator: object | None
    notes: dict  # what was done to the records (printed as read), kept in the summary
    batches: list[dict] | None  # the init's (this process's share), None on --resume


@dataclass
class _Init:
    """What the init step made: the step-0 model, and the checkpoint a resumed run continues from."""

    peft_model: torch.nn.Module
    checkpoint: Path | None
    probe: dict
    probe_seconds: float
    init_seconds: float


def run_finetune(s: FinetuneSettings, step0_eval: dict | None = None,
                 callbacks: tuple[TrainerCallback, ...] = ()) -> dict:
    """The whole `finetune` recipe; returns a summary of the run. `step0_eval` supplies the step-0
    evaluation when the caller already knows it (an identical init, in `demo`); `callbacks` go to the
    Trainer."""
    s = _settled(s)
    out = Path(s.out)
    targs = training_arguments(s, out)  # joins the launcher's process group, if any
    data = _load_data(s, targs)  # too few records and the like are refused before anything is written
    if not s.resume:
        _start_run_folder(s, out)
    init = _initialise(s, data, out)
    trainer, run_log, stop = _build_trainer(s, data, init, targs, out, callbacks)
    _train(trainer, stop, out, init.checkpoint, data.evaluator, step0_eval)
    return _finish(s, data, init, trainer, run_log, out)


def _settled(s: FinetuneSettings) -> FinetuneSettings:
    """A copy of the settings, checked, with the defaults that depend on the model, data and machine
    filled in (the run's, not the caller's), and the machine and --out checked against them."""
    s = dataclasses.replace(s)
    s.check()
    check_writable(s.out)
    _complete_defaults(s)
    _check_environment(s)
    _check_out_dir(Path(s.out), s)
    return s


def _load_data(s: FinetuneSettings, targs: TrainingArguments) -> _Data:
    """The model (on the Trainer's device), the training features, the held-out evaluation and, unless
    resuming, this process's share of the init batches: drawn now, so that too few records is refused
    before anything is written."""
    set_seed(s.seed)  # a classifier's fresh head is drawn when the model loads
    fields = s.fields
    model, tokenizer, task, records, feats, label2id = load_task_data(s, s.data)
    notes = {"training": feats.note}
    eval_records = None
    if s.eval_split is not None:
        train_idx, eval_idx = _split(len(records), s.eval_split, s.seed)
        feats, eval_records = [feats[i] for i in train_idx], [records[i] for i in eval_idx]
        records = [records[i] for i in train_idx]
    elif s.eval_data:
        eval_records = read_records(s.eval_data, task, fields)
    if not feats:
        raise UsageError(f"{s.data}: no training examples are left.")
    init_sample_indices(len(feats), s.init_samples, s.seed)  # too few records: refuse before writing
    choices = choices_of(records, task, fields, s.choices)
    evaluator = None
    if eval_records is not None:
        evaluator = make_evaluator(task, eval_records, tokenizer, fields, s.max_length, s.chat_template, choices,
                                   label2id, s.eval_batch_size, progress=not s.quiet, too_long=s.too_long,
                                   max_generate=s.generate_samples, max_new_tokens=s.max_new_tokens)
        notes["evaluation"] = evaluator.note
        if evaluator.note and is_main_process():
            print(f"{s.eval_data or 'the held-out split'}: {evaluator.note}", flush=True)
    model.to(targs.device)
    batches = None
    if not s.resume:  # the init samples, then the gamma search's; by the seed alone, not the processes
        batches = init_batches(feats, s.init_samples, s.init_batch_size, s.seed, tokenizer.pad_token_id,
                               search_batch_size=s.eval_batch_size if s.gamma_search else None,
                               part=(process_index(), targs.world_size))
    return _Data(model, tokenizer, task, feats, label2id, choices, evaluator, notes, batches)


def _start_run_folder(s: FinetuneSettings, out: Path) -> None:
    """Replace an earlier run's files (--overwrite) and record the settings, on the main process: only
    now that model and data are known to load."""
    if is_main_process():
        remove_ours(out, RUN_FILES)
        write_text_atomic(out / ARGS, json.dumps(as_dict(s), indent=2) + "\n")


def _initialise(s: FinetuneSettings, data: _Data, out: Path) -> _Init:
    """The step-0 model: the linear probe (if asked) and the LoRA-One init, its state saved for --resume;
    or, resuming, the saved step-0 state (no probe, no gradient pass, no SVD) and the last checkpoint."""
    t0 = time.perf_counter()
    lora_config = lora_config_of(s, data.task)
    if s.resume:
        checkpoint = completed_checkpoint(out)
        _check_checkpoint(checkpoint)
        state = _load_step0(out / STEP0)
        init = _Init(restore_lora_one(data.model, lora_config, state), checkpoint,
                     state["metadata"].get("probe", {}), 0.0, 0.0)
    else:
        probe = {}
        if data.task == CLASSIFICATION and s.head_init == "probe":
            probe = probe_head(data.model, data.features, data.tokenizer.pad_token_id, s.probe_samples, s.seed,
                               s.probe_l2)
        probe_seconds = time.perf_counter() - t0
        peft_model = get_lora_one_model(data.model, lora_config, data.batches, config=s.lora_one_config(),
                                        show_progress_bar=not s.quiet)
        peft_model.lora_one_metadata["probe"] = probe
        if is_main_process():
            _save_step0(out / STEP0, lora_one_state(peft_model))
        init = _Init(peft_model, None, probe, probe_seconds, 0.0)
    init.init_seconds = time.perf_counter() - t0
    if is_main_process():
        if "gamma_search" in init.peft_model.lora_one_metadata:
            print(gamma_line(init.peft_model.lora_one_metadata), flush=True)
        print(f"{s.variant}{' + preconditioner' if s.precondition else ''}: init {init.init_seconds:.1f} s "
              f"(probe {init.probe_seconds:.1f} s), {_trainable(init.peft_model):,} trainable parameters", flush=True)
    return init


def _trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _build_trainer(s: FinetuneSettings, data: _Data, init: _Init, targs: TrainingArguments, out: Path,
                   callbacks: tuple[TrainerCallback, ...]) -> tuple[_Trainer, RunLog, StopOnSignal]:
    """The Trainer over the step-0 model, its steps set from the data, with our log and stop callbacks
    in place of its printer and progress bar."""
    total = total_steps(s, len(data.features))
    targs.max_steps, targs.warmup_steps = total, warmup_steps(s, total)
    main = is_main_process()
    run_log = RunLog(out / METRICS if main else None, s.eval_every, data.evaluator is not None, not s.quiet,
                     keep_until=step_of(init.checkpoint) if init.checkpoint else None)
    stop = StopOnSignal()
    trainer = _Trainer(
        model=init.peft_model, args=targs, train_dataset=data.features,
        # an encoder-decoder's decoder inputs in the batch: the Trainer keeps the labels from a model whose loss
        # is computed outside it
        data_collator=partial(collate, pad_id=data.tokenizer.pad_token_id,
                              decoder_start_id=data.model.config.decoder_start_token_id
                              if data.task == SEQ2SEQ else None),
        callbacks=[run_log, stop, *callbacks], evaluator=data.evaluator, settings=s,
        compute_loss_func={CLASSIFICATION: _class_loss, SEQ2SEQ: _decoder_loss}.get(data.task),
    )
    for quiet_default in (PrinterCallback, ProgressCallback):  # RunLog shows the progress instead
        trainer.remove_callback(quiet_default)
    for cb in trainer.callback_handler.callbacks:  # its folder is set at train begin, after our step-0 eval
        if isinstance(cb, TensorBoardCallback) and cb.logging_dir is None:
            cb.logging_dir = str(out / default_logdir())
    return trainer, run_log, stop


def _train(trainer: _Trainer, stop: StopOnSignal, out: Path, checkpoint: Path | None, evaluator,
           step0_eval: dict | None) -> None:
    """The step-0 evaluation (unless resuming), then the Trainer's loop; an interruption ends in a
    complete checkpoint and the command that resumes it."""
    if checkpoint is None and evaluator is not None:
        if step0_eval is not None:
            trainer.log_metrics_at_step({f"eval_{k}": v for k, v in step0_eval.items()})
        else:
            trainer.evaluate()
    main = is_main_process()
    resume_hint = f"lora-one finetune --config {out / ARGS} --resume"
    try:
        with stop.installed(), warnings.catch_warnings():
            # checkpoints of base-changing variants hold the converted adapter on purpose (see save.py)
            warnings.filterwarnings("ignore", message=r"save_pretrained\(.*ORIGINAL base model", category=UserWarning)
            trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    except KeyboardInterrupt:
        if main:
            last = completed_checkpoint(out)
            hint = (f"The last checkpoint {last} is complete; resume with:\n  {resume_hint}" if last
                    else "There is no checkpoint yet; start again with --overwrite.")
            print(f"Stopped at once. {hint}", file=sys.stderr, flush=True)
        raise
    if stop.stopped_at is not None and stop.stopped_at < trainer.args.max_steps:
        ckpt = completed_checkpoint(out)
        if main:
            print(f"Interrupted after step {stop.stopped_at}; checkpoint {ckpt} is complete. Resume with:\n"
                  f"  {resume_hint}", file=sys.stderr, flush=True)
        raise TrainingInterrupted(stop.stopped_at, ckpt)


def _finish(s: FinetuneSettings, data: _Data, init: _Init, trainer: _Trainer, run_log: RunLog, out: Path) -> dict:
    """The run's summary; on the main process the loss plot, then the adapter with its sidecar (last: it
    marks the run complete) and the upload. Returns the summary once every process is done."""
    metrics = run_log.entries
    evals = [m for m in metrics if any(k.startswith("eval_") for k in m)]
    steps = trainer.state.global_step - step_of(init.checkpoint)
    summary = {
        "variant": s.variant,
        "precondition": s.precondition,
        "out": str(out),
        "process_index": process_index(),
        "steps": trainer.state.global_step,
        "init_seconds": round(init.init_seconds, 3),
        "probe_seconds": round(init.probe_seconds, 3),
        "train_seconds": round(run_log.train_seconds, 3),
        "eval_seconds": round(trainer.eval_seconds, 3),
        "steps_per_second": round(steps / run_log.train_seconds, 4) if run_log.train_seconds else None,
        "trainable_parameters": _trainable(init.peft_model),
        "processes": trainer.args.world_size,
        "step0_eval": evals[0] if evals and evals[0]["step"] == 0 else None,
        "final_eval": evals[-1] if evals else None,
        "data_notes": {k: v for k, v in data.notes.items() if v},
        "metrics": metrics,
    }
    meta = {
        "model": s.model, "data": str(s.data), "task": data.task, "variant": s.variant,
        "precondition": s.precondition, "prec_reg": s.prec_reg, "chat_template": s.chat_template,
        "fields": vars(s.fields), "choices": data.choices, "label2id": data.label2id, "head_init": s.head_init,
        **init.probe,
        "init_sample_indices": init_sample_indices(len(data.features), s.init_samples, s.seed),
        "training": {k: v for k, v in summary.items() if k not in ("metrics", "out", "process_index")},
    }
    if is_main_process():
        plot_loss(metrics, out / "loss.png", title=f"{s.variant}{' + precond' if s.precondition else ''}")
        # last, into the run folder (its other files stay): adapter_config.json marks the run complete
        save_adapter(init.peft_model, out, extra=meta, base_model_name=base_model_name_of(s))
        if s.push_to_hub:
            summary["hub_url"] = push_adapter(out, s.hub_model_id or out.resolve().name)
    trainer.accelerator.wait_for_everyone()  # the job ends when the files are written
    return summary
