"""Data parallelism: join the process group that `torchrun` or `accelerate launch` describes.

Both launchers start one process per device and describe the job in environment variables
(`WORLD_SIZE`, `RANK`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`); `torch.distributed` reads them.
Every rank holds the full model; only rank 0 writes files and shows progress. Collectives wait up to
`LORA_ONE_DIST_TIMEOUT` seconds (default 2 hours) for the slowest process, since rank 0 evaluates
alone while the others wait.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist

from lora_one.errors import UsageError

DEVICE_KINDS = ("cpu", "cuda", "mps")
TIMEOUT_VAR = "LORA_ONE_DIST_TIMEOUT"
# Seconds a collective waits for the slowest process. Rank 0 evaluates alone while the others wait at
# the next collective; NCCL's own default (10 minutes) would end a run whose evaluation takes longer.
DEFAULT_TIMEOUT = 2 * 60 * 60


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if distributed() else 1


def is_main_process() -> bool:
    return rank() == 0


def barrier() -> None:
    if distributed():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In place; SUM (and a division by the caller where a mean is wanted): gloo has no AVG."""
    if distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
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
    raise UsageError(f"rank {first} of {len(messages)}: {messages[first]}") from error


def launched_world_size() -> int:
    """The number of processes a launcher started (1 when run as a plain command)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise UsageError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number; unset it or launch with torchrun.") from None


def refuse_ignored_launch_settings(bf16: bool) -> None:
    """Refuse `accelerate launch` settings that the fine-tuning loop would otherwise silently ignore:
    it trains with DistributedDataParallel and reads its precision from its own `--bf16` flag."""
    for var, what in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed"),
                      ("ACCELERATE_USE_MEGATRON_LM", "Megatron-LM")):
        if os.environ.get(var, "").lower() == "true":
            raise UsageError(
                f"accelerate launch with {what}: lora-one finetune trains with DistributedDataParallel "
                "(the full model on every process); launch with --multi_gpu, or with torchrun."
            )
    precision = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if precision not in ("no", "bf16") or (precision == "bf16" and not bf16):
        raise UsageError(
            f"accelerate launch --mixed_precision {precision}: lora-one finetune takes its precision from "
            "its own --bf16 flag (bfloat16 autocast; no fp16). Pass --bf16, or launch with --mixed_precision no."
        )


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


def collective_timeout() -> timedelta:
    """How long a collective waits for the slowest process: `LORA_ONE_DIST_TIMEOUT` seconds, default 2 hours."""
    value = os.environ.get(TIMEOUT_VAR, str(DEFAULT_TIMEOUT))
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not (seconds > 0 and math.isfinite(seconds)):
        raise UsageError(f"{TIMEOUT_VAR}={value!r} must be a number of seconds > 0; unset it for {DEFAULT_TIMEOUT}.")
    return timedelta(seconds=seconds)


@contextmanager
def process_group(device: str) -> Iterator[torch.device]:
    """Yield the device this process works on, inside the launcher's process group if there is one.

    Under a launcher, `device` names the kind (`cpu`, `cuda`): each process takes `cuda:LOCAL_RANK`
    and NCCL, or the CPU and gloo, with collectives that wait `collective_timeout()`. A group that the caller
    already initialised is used as it is.
    """
    dev = resolve_device(device)
    if launched_world_size() <= 1 or distributed():
        yield dev
        return
    if dev.type == "cuda":
        if dev.index is not None:
            raise UsageError(
                f"--device {device} under a multi-process launcher: each process uses cuda:LOCAL_RANK; "
                "pass --device cuda (or auto), and CUDA_VISIBLE_DEVICES to choose the GPUs."
            )
        dev = resolve_device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}")
        torch.cuda.set_device(dev)
    elif dev.type != "cpu":
        raise UsageError(f"--device {device}: data parallelism runs on cpu (gloo) or cuda (NCCL).")
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=collective_timeout())
    try:
        yield dev
    finally:
        dist.destroy_process_group()
