"""A cache of one-step gradients on disk: sweeps over rank, gamma or variant take the gradient once.

`estimate_gradients(..., grad_cache=DIR)` (and `LoraOneConfig(grad_cache=DIR)`, the command line's
`--grad-cache`) looks the gradient up under a key before any backward, and stores it after computing it.
The key is the SHA-256 of a JSON of everything that fixes the result (`key_fields`):

- the model: its class, a SHA-256 of its config, and a SHA-256 of the bytes of its state dict (every
  parameter and persistent buffer, a quantised weight's scales), names, dtypes and shapes included (a
  LoRA layer's factors count by their product `s B A`).
  Exact and the same on every device; it costs one read of the weights (docs/measurements.md#gradient-cache).
  A path or a name would not do: a fresh classifier head, a fitted probe head or weights changed in
  place give another gradient from the same checkpoint;
- the target layers and their shapes; the init samples (`hash_batches` of each rank's micro-batches, so
  another micro-batching or another split over the ranks, whose `G` is equal only to round-off, is
  another entry); the memory mode (`grad_mode`), and what shapes the result in that mode (`single-batch`: the
  SVD's seed; `sketch`: seed, sketch passes, oversampling);
- what changes the rounding: the device type, an autocast dtype, and the torch, transformers and
  lora-one versions.

A custom `train_step` cannot be told apart from another, so it is refused with a cache.

An entry is two files, each written atomically (`lora_one.core.files.replacing`), the manifest removed first
and written last: `KEY.safetensors` (`accumulate`: `G` per layer; `single-batch` and `sketch`: the top-r
SVD, `LAYER/U`, `/S`, `/Vh`) and `KEY.json` (the key's fields, what the entry holds and the SHA-256 of
the tensor file). A read checks
the manifest's fields against the key's and the tensor file against its checksum (hashed in chunks), then
maps the tensors from the file: an `accumulate` entry, 4 bytes per target weight, is never in memory twice.
A damaged entry is never used: a one-line warning, the gradient is recomputed and the entry rewritten. A layer's
top-r SVD serves every rank up to its r (its first triplets: as accurate as a fresh smaller sketch or more,
though not bit-identical to one); a larger rank for any layer recomputes and replaces the entry. The ranks are
per layer, as `rank_pattern` makes them. Under `torch.distributed`
every rank passes the same folder and reads it (hits need a folder all ranks see), all recompute unless
every rank found the entry, and rank 0 writes; no rank waits for a file, so nothing can hang.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Iterable, Mapping
from importlib.metadata import version
from pathlib import Path

import torch
import torch.distributed as dist
import transformers
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from lora_one.core.errors import UsageError
from lora_one.core.files import replacing, write_text_atomic
from lora_one.core.parallel import all_reduce_sum, distributed, is_main_process, world_size
from lora_one.core.targets import base_model_of, lora_layers
from lora_one.linalg.spectral import TopSVD

FORMAT = "lora-one gradient cache"
FORMAT_VERSION = 2  # 2: the SVD's rank per layer
_SVD_PARTS = ("U", "S", "Vh")


def hash_batches(batches: Iterable[Mapping]) -> str:
    """SHA-256 of the tensors of micro-batches (key, dtype, shape and bytes of each), to record which
    samples made the init (and judged its gamma)."""
    h = hashlib.sha256()
    for batch in batches:
        for key in sorted(batch):
            value = batch[key]
            if isinstance(value, torch.Tensor):
                h.update(f"{key} {value.dtype} {tuple(value.shape)}\n".encode())
                h.update(_tensor_bytes(value))
    return h.hexdigest()


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.detach().reshape(-1).contiguous().cpu().view(torch.uint8).numpy())


def weights_sha256(model: nn.Module) -> str:
    """SHA-256 of every entry of `model.state_dict()` (parameters, persistent buffers, and what a quantised
    weight keeps beside its packed bytes: bitsandbytes' scales and quantisation state), with their names,
    dtypes and shapes. A LoRA layer counts by what it adds to its weight, `s B A` per adapter, not by its
    factors: a fresh adapter's random `A` beside `B = 0` changes neither the function nor the gradient (the
    Trainer callback's case)."""
    h = hashlib.sha256()

    def add(name: str, t: torch.Tensor) -> None:
        h.update(f"{name} {t.dtype} {tuple(t.shape)}\n".encode())
        h.update(_tensor_bytes(t))

    for name, t in model.state_dict().items():
        if ".lora_A." not in name and ".lora_B." not in name:
            add(name, t)
    with torch.no_grad():
        for name, layer in lora_layers(model).items():
            for adapter in sorted(layer.lora_A):
                add(f"{name}.{adapter}.delta", layer.scaling[adapter] * (layer.lora_B[adapter].weight.float()
                                                                         @ layer.lora_A[adapter].weight.float()))
    h.update(repr(getattr(model, "active_adapters", None)).encode())
    return h.hexdigest()


def _config_sha256(config: transformers.PreTrainedConfig) -> str:
    """SHA-256 of the config's settings, not of where it was read from."""
    settings = {k: v for k, v in config.to_dict().items() if k != "_name_or_path"}
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def key_fields(model: nn.Module, targets: Mapping[str, nn.Module], samples: list[Mapping], grad_mode: str,
               seed: int, oversample: int | None, sketch_passes: int) -> dict:
    """What fixes `estimate_gradients`' result (module docstring). Collective under `torch.distributed`."""
    base = base_model_of(model)
    config = getattr(base, "config", None)
    device = next(iter(targets.values())).weight.device
    fields = {
        "model": {
            "class": f"{type(base).__module__}.{type(base).__qualname__}",
            "config_sha256": _config_sha256(config) if isinstance(config, transformers.PreTrainedConfig) else None,
            "weights_sha256": weights_sha256(model),
        },
        "targets": {n: [m.out_features, m.in_features] for n, m in targets.items()},
        "samples_sha256": _per_rank(hash_batches(samples)),
        "grad_mode": grad_mode,
        "device": device.type,
        "autocast": str(torch.get_autocast_dtype(device.type)) if torch.is_autocast_enabled(device.type) else None,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "lora-one": version("lora-one")},
    }
    if grad_mode != "accumulate":
        fields["seed"] = seed
    if grad_mode == "sketch":
        fields.update(sketch_passes=sketch_passes, oversample=oversample)
    return fields


def _per_rank(value: str) -> list[str]:
    """`value` of every rank, in rank order."""
    if not distributed():
        return [value]
    values = [None] * world_size()
    dist.all_gather_object(values, value)
    return values


def _key(fields: dict) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


class _Damaged(Exception):
    """An entry that must not be used; the message says why."""


class GradientCache:
    """`estimate_gradients`' results under `folder`, one entry per key (module docstring). After each
    lookup, `last` is `{"entry": tensor file, "hit": bool}` (and after a store, `"written": bool`), which
    the init records in `lora_one.json`."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        if self.folder.exists() and not self.folder.is_dir():
            raise UsageError(f"grad_cache {str(folder)!r} is a file; give a folder for the gradient cache.")
        self.last: dict | None = None

    def _paths(self, fields: dict) -> tuple[Path, Path]:
        key = _key(fields)
        return self.folder / f"{key}.json", self.folder / f"{key}.safetensors"

    def lookup(self, fields: dict, ranks: Mapping[str, int] | None, targets: Mapping[str, nn.Module],
               offload: bool) -> dict[str, torch.Tensor | TopSVD] | None:
        """The entry for `fields` (`ranks`: each layer's r for the SVD modes, None in `accumulate` mode),
        checked, on the devices `estimate_gradients` returns its result on; None when this process or any
        other has no usable entry (then every process recomputes)."""
        manifest, tensors = self._paths(fields)
        found = None
        if manifest.exists():
            try:
                found = self._read(manifest, tensors, fields, ranks)
            except _Damaged as e:
                warnings.warn(f"gradient cache entry {tensors} is damaged ({e}); not using it: the gradient is "
                              "recomputed and the entry rewritten.", stacklevel=3)
        device = next(iter(targets.values())).weight.device
        if all_reduce_sum(torch.tensor([float(found is None)], device=device)).item():
            found = None
        self.last = {"entry": str(tensors), "hit": found is not None}
        if found is None:
            return None
        if is_main_process():  # said even when quiet: the run did not take the gradient it records
            print(f"gradient cache hit: {tensors} (backward skipped)", flush=True)
        return {name: _to(value, "cpu" if offload and isinstance(value, torch.Tensor) else targets[name].weight.device)
                for name, value in found.items()}

    def _read(self, manifest: Path, tensors: Path, fields: dict, ranks: Mapping[str, int] | None) -> dict | None:
        try:
            meta = json.loads(manifest.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise _Damaged(f"{type(e).__name__}: {e}") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
            raise _Damaged("not a manifest of this cache format")
        if meta.get("fields") != json.loads(json.dumps(fields)):
            raise _Damaged("its manifest describes another gradient than its name")
        stored = _mapped_if_intact(tensors, meta.get("tensors_sha256"))
        shapes = fields["targets"]
        if fields["grad_mode"] == "accumulate":
            if {n: list(t.shape) for n, t in stored.items()} != shapes:
                raise _Damaged("its layers or shapes differ from the model's")
            return stored
        held = meta.get("ranks")
        if (not isinstance(held, dict) or held.keys() != shapes.keys()
                or {k for k in stored} != {f"{n}/{p}" for n in shapes for p in _SVD_PARTS}):
            raise _Damaged("its layers differ from the model's")
        short = [n for n in shapes if held[n] < ranks[n]]
        if short:
            if is_main_process():
                print(f"gradient cache: {tensors} holds a rank-{held[short[0]]} SVD of {short[0]!r}, fewer than rank "
                      f"{ranks[short[0]]}; recomputing", flush=True)
            return None
        out = {}
        for name, (m, n) in shapes.items():
            U, S, Vh = (stored[f"{name}/{p}"] for p in _SVD_PARTS)
            r = held[name]
            if U.shape != (m, r) or S.shape != (r,) or Vh.shape != (r, n):
                raise _Damaged(f"the SVD of {name!r} has the wrong shapes")
            out[name] = TopSVD(U[:, : ranks[name]], S[: ranks[name]], Vh[: ranks[name]])
        return out

    def store(self, fields: dict, ranks: Mapping[str, int] | None,
              gradients: Mapping[str, torch.Tensor | TopSVD]) -> None:
        """Write the entry for `fields` (rank 0 only). A failed write is a warning: the run has its gradient."""
        if not is_main_process():
            return
        manifest, tensors = self._paths(fields)
        flat = {}
        for name, value in gradients.items():
            parts = {name: value} if isinstance(value, torch.Tensor) else {
                f"{name}/{p}": getattr(value, p) for p in _SVD_PARTS}
            flat.update({k: v.detach().to("cpu").contiguous() for k, v in parts.items()})
        written = False
        try:
            manifest.unlink(missing_ok=True)  # the marker leaves first: a half-rewritten entry is no entry
            with replacing(tensors) as tmp:
                save_file(flat, tmp)
                with tmp.open("rb") as f:
                    checksum = hashlib.file_digest(f, "sha256").hexdigest()
            meta = {"format": FORMAT, "version": FORMAT_VERSION, "fields": fields, "tensors": tensors.name,
                    "tensors_sha256": checksum, "ranks": None if fields["grad_mode"] == "accumulate" else dict(ranks)}
            write_text_atomic(manifest, json.dumps(meta, indent=1, sort_keys=True) + "\n")  # last: marks it complete
            written = True
        except (OSError, UsageError) as e:  # raised on rank 0 alone: the other ranks must not wait for it
            warnings.warn(f"could not write the gradient cache entry {tensors} ({e}); the run goes on without it.",
                          stacklevel=3)
        self.last = {"entry": str(tensors), "hit": False, "written": written}


def _mapped_if_intact(path: Path, sha256: str | None) -> dict[str, torch.Tensor]:
    """The tensors of `path`, mapped copy-on-write from the file, not read into memory, if the file's
    SHA-256 is `sha256`."""
    try:
        with path.open("rb") as f:
            if hashlib.file_digest(f, "sha256").hexdigest() != sha256:
                raise _Damaged("the tensor file does not match its checksum")
            with safe_open(path, framework="pt") as mapped:
                if not os.path.samestat(os.fstat(f.fileno()), os.stat(path)):  # a writer's os.replace since the hash
                    raise _Damaged("the tensor file was replaced while it was read")
                return {name: mapped.get_tensor(name) for name in mapped.keys()}
    except OSError as e:
        raise _Damaged(f"{type(e).__name__}: {e}") from None
    except SafetensorError as e:
        raise _Damaged(f"unreadable tensor file: {e}") from None


def _to(value: torch.Tensor | TopSVD, device) -> torch.Tensor | TopSVD:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    return TopSVD(value.U.to(device), value.S.to(device), value.Vh.to(device))
