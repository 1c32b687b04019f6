"""The few `torch.distributed` helpers the library needs, all no-ops in a single process.

The process group itself is the launcher's and the Trainer's business (`torchrun` or `accelerate
launch` describe the job in environment variables; `TrainingArguments` joins it). Here: which process
this is, a SUM all-reduce, and errors raised on every process together. "Rank" in this package means
the LoRA rank; a process is known by its index.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist

from lora_one.core.errors import UsageError

DEVICE_KINDS = ("cpu", "cuda", "mps")


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def process_index() -> int:
    return dist.get_rank() if distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if distributed() else 1


def is_main_process() -> bool:
    return process_index() == 0


def barrier() -> None:
    if distributed():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
    """In place; SUM (and a division by the caller where a mean is wanted): gloo has no AVG. With `device`
    (the model's), a tensor held elsewhere (CPU bookkeeping, an offloaded accumulator) is summed there
    and copied back: NCCL reduces GPU tensors only."""
    if distributed():
        on_device = t if device is None else t.to(device)
        dist.all_reduce(on_device, op=dist.ReduceOp.SUM)
        if on_device is not t:
            t.copy_(on_device)
    return t


@contextmanager
def raise_together(device: torch.device) -> Iterator[None]:
    """A `UsageError` raised in the block on any rank is raised on every rank, with the message of the
    first rank that raised, so that no rank is left waiting in a later collective for one that left.
    Every rank must run the block: it ends with one all-reduce (and a gather of the messages on error)."""
    if not distributed():
        yield
        return
    error = None
    try:
        yield
    except UsageError as e:
        error = e
    if not all_reduce_sum(torch.tensor([float(error is not None)], device=device)).item():
        return
    messages = [None] * world_size()
    dist.all_gather_object(messages, None if error is None else str(error))
    first = next(r for r, m in enumerate(messages) if m is not None)
    raise UsageError(f"process {first} of {len(messages)}: {messages[first]}") from error


def resolve_device(name: str) -> torch.device:
    """`--device`: `auto` (the GPU when CUDA has one, else the CPU), or `cpu`, `cuda`, `cuda:N`, `mps`,
    checked against what this machine has."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in DEVICE_KINDS:
        raise UsageError(f"--device {name!r} is not a device; use auto, cpu, cuda, cuda:N or mps.")
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            why = "this torch is built without CUDA" if torch.version.cuda is None else "CUDA sees no GPU"
            raise UsageError(f"--device {name}: {why}; use --device cpu (or auto).")
        if dev.index is not None and dev.index >= count:
            raise UsageError(f"--device {name}: CUDA sees {count} GPU(s), cuda:0 to cuda:{count - 1}; choose one of them.")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {name}: MPS is not available on this machine; use --device cpu (or auto).")
    return dev
