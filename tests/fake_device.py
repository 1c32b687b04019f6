"""A second device on a CPU-only machine, for tests/test_devices.py: `fakedev`, torch's PrivateUse1
backend renamed, whose tensors hold CPU data and compute with the CPU's kernels, but are on another
device as far as the code can tell: a tensor on it mixed with a CPU tensor (not a 0-d one) is an
error, as on a GPU. Like MPS it refuses float64 unless `STATE["float64"]`; `FakeNccl` is a NCCL
process group of one process, whose collectives take tensors on the device only.

Torch's autograd engine sizes its device threads at the first backward of a process, and the backend
cannot be taken back, so `install` sets it up in a process of its own, before any backward: `python
fake_device.py OUT` runs every case of `CASES` on the CPU and on `fakedev` and saves, per case, the
step-0 products `B @ A` of both, or the error. Importing this module changes nothing.
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
from conftest import padded_batches, ragged_examples, tiny_llama
from numerics import products
from peft import LoraConfig
from tiny_models import LORA
from torch.utils._pytree import tree_map
from torch.utils.backend_registration import _setup_privateuseone_for_python_backend

import lora_one.core.parallel
import lora_one.linalg.sketch
from lora_one import LoraOneConfig, get_lora_one_model

NAME = "fakedev"
STATE = {"float64": False, "device": None, "library": None}  # device and kernels: once installed
# Ops that move data between devices, as on a real one.
_COPIES = {"_to_copy", "copy_", "_copy_from", "_copy_from_and_resize", "copy"}


class OnFake(torch.Tensor):
    """A tensor on `fakedev`: CPU data behind a wrapper that says it lives elsewhere."""

    @staticmethod
    def __new__(cls, data: torch.Tensor):
        if data.dtype == torch.float64 and not STATE["float64"]:
            raise TypeError(f"{NAME} has no float64 (as MPS): a float64 tensor was made on it")
        t = torch.Tensor._make_wrapper_subclass(cls, data.shape, strides=data.stride(), dtype=data.dtype,
                                                device=STATE["device"], storage_offset=data.storage_offset(),
                                                requires_grad=data.requires_grad)
        t.cpu_data = data
        return t

    def __repr__(self, **kwargs):
        return f"OnFake({self.cpu_data!r})"

    def tolist(self):  # torch's own refuses tensor subclasses
        return self.cpu_data.tolist()

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        on_fake, on_cpu = False, False

        def unwrap(x):
            nonlocal on_fake, on_cpu
            if isinstance(x, OnFake):
                on_fake = True
                return x.cpu_data
            if isinstance(x, torch.Tensor) and x.ndim:
                on_cpu = True
            if isinstance(x, torch.device) and x.type == NAME:
                return torch.device("cpu")
            return x

        a, k = tree_map(unwrap, args), tree_map(unwrap, kwargs)
        name = func.overloadpacket.__name__
        if on_fake and on_cpu and name not in _COPIES and not name.startswith("index"):  # CPU indices are fine
            raise RuntimeError(f"{func}: expected all tensors on one device, got {NAME} and cpu")
        if "device" in kwargs and kwargs["device"] is not None:
            on_fake = torch.device(kwargs["device"]).type == NAME
        out = func(*a, **k)
        written = [args[i] if i < len(args) else kwargs[arg.name] for i, arg in enumerate(func._schema.arguments)
                   if arg.alias_info is not None and arg.alias_info.is_write]
        if written:  # in place or out=: the wrappers of the arguments it wrote
            return written[0] if len(written) == 1 else tuple(written)
        if not on_fake:
            return out
        return tree_map(lambda x: OnFake(x) if isinstance(x, torch.Tensor) else x, out)


def _copy_from(src, dst, non_blocking=False):
    (dst.cpu_data if isinstance(dst, OnFake) else dst).copy_(src.cpu_data if isinstance(src, OnFake) else src)
    return dst


def install() -> None:
    """PrivateUse1 as `fakedev`, with kernels for the tensors made on it without a tensor argument
    (`torch.tensor(..., device=)`, `torch.zeros`) and for copies to and from it."""
    _setup_privateuseone_for_python_backend(NAME)
    STATE["device"] = torch.device(NAME, 0)
    lib = torch.library.Library("aten", "IMPL")
    lib.impl("empty_strided", lambda size, stride, dtype=None, layout=None, device=None, pin_memory=None:
             OnFake(torch.empty_strided(size, stride, dtype=dtype)), "PrivateUse1")
    lib.impl("empty.memory_format", lambda size, dtype=None, layout=None, device=None, pin_memory=None,
             memory_format=None: OnFake(torch.empty(size, dtype=dtype)), "PrivateUse1")
    lib.impl("_copy_from", _copy_from, "PrivateUse1")
    STATE["library"] = lib  # registrations last as long as their Library


class FakeNccl:
    """`torch.distributed` as one process of a NCCL group of one sees it: every all-reduce takes a tensor
    on the device (NCCL reduces GPU tensors only) and, over one process, leaves it as it is."""

    ReduceOp = dist.ReduceOp

    def __init__(self):
        self.reduced = []  # the shapes all-reduced

    def is_available(self):
        return True

    def is_initialized(self):
        return True

    def get_rank(self):
        return 0

    def get_world_size(self):
        return 1

    def all_reduce(self, t, op=None):
        if t.device.type != NAME:
            raise RuntimeError(f"NCCL reduces tensors on the GPU only, got one on {t.device}")
        self.reduced.append(tuple(t.shape))

    def all_gather_object(self, out, obj):
        out[0] = obj


CASES = {  # name: (LoraOneConfig settings, micro-batch size, float64 on the device, NCCL)
    **{f"mps {mode}": ({"grad_mode": mode}, 6 if mode == "single-batch" else 2, False, False)
       for mode in ("accumulate", "single-batch", "sketch")},
    **{f"nccl {mode}": ({"grad_mode": mode, "offload": mode == "accumulate"}, 6 if mode == "single-batch" else 2,
                        True, True) for mode in ("accumulate", "single-batch", "sketch")},
}
# 3 ragged init examples and 3 held out for the gamma search, padded, the boundary inside a micro-batch
EXAMPLES = (5, 3, 6, 7, 4, 9)
INIT = 3
TARGETS = ["q_proj", "v_proj", "down_proj"]


def run(case: str) -> dict[str, dict]:
    """`case` on the CPU and on `fakedev`, with a gamma search (so its sums too): per device, the step-0
    products `B @ A`, the gamma chosen and the shapes all-reduced."""
    kwargs, batch_size, float64, nccl = CASES[case]
    batches = padded_batches(ragged_examples(lengths=EXAMPLES), batch_size)
    config = LoraConfig(**{**LORA, "target_modules": TARGETS})
    out = {}
    for where in ("cpu", NAME):
        STATE["float64"] = float64
        lora_one.linalg.sketch.NO_FLOAT64 = ("mps",) if float64 else ("mps", NAME)  # as the device is
        fake_dist = FakeNccl()
        if nccl and where == NAME:
            lora_one.core.parallel.dist = fake_dist
        try:
            model = get_lora_one_model(tiny_llama().to(where), config, batches, show_progress_bar=False,
                                       config=LoraOneConfig(gamma=[8.0, 16.0, 32.0], init_samples=INIT, **kwargs))
        finally:
            lora_one.core.parallel.dist = dist
        out[where] = {"products": products({n: p.detach().cpu() for n, p in model.named_parameters()}),
                      "gamma": model.lora_one_metadata["gamma"], "reduced": fake_dist.reduced}
    return out


def main(path: Path) -> None:
    install()
    results = {}
    for case in CASES:
        try:
            results[case] = run(case)
        except Exception:  # noqa: BLE001 (the test reports it)
            results[case] = traceback.format_exc()
    torch.save(results, path)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
