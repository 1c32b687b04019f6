"""Step 1 of LoRA-One: the one-step full fine-tuning gradient of every target weight.

`G = dL/dW` at the current weights, averaged over the given batches (and over the ranks of a
`torch.distributed` job), where `L` is the model's own `.loss`. Three memory modes:

- `accumulate`: only the target weights take a gradient; each is moved into an fp32 accumulator (on
  the weight's device, or on CPU with `offload=True`) by a post-accumulate-grad hook as soon as autograd
  produces it, so at most one raw layer gradient lives beside the accumulators. Returns `G` per layer.
- `single-batch`: for one micro-batch holding all N samples, each layer's top-r SVD is taken inside
  its hook and the gradient dropped at once. Returns a `TopSVD` per layer.
- `sketch`: never forms a weight gradient. For `y = x W^T`, `G = sum_t g_t^T x_t`; forward hooks keep
  the layer inputs `x`, tensor hooks on the outputs receive `g = dL/dy`, and both feed the linear
  sketches `G @ Omega`, `Psi @ G` (`lora_one.sketch`). The base weights need no `requires_grad`, so a
  frozen or quantised base works and the backward costs what a LoRA training step's backward costs.
  `passes > 1` runs the batches again, each pass sketching with test matrices built from the previous
  pass's all-reduced sketches (subspace iteration): more accurate for slowly decaying spectra, at one
  forward and backward over the data per pass. Returns a `TopSVD` per layer.

The model is left exactly as it was found: weights, `requires_grad` flags, train/eval mode, `.grad`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn
from tqdm.auto import tqdm

from lora_one.errors import UsageError
from lora_one.parallel import all_reduce_sum, is_main_process, world_size
from lora_one.sketch import GradientSketch, default_sizes, test_matrix
from lora_one.spectral import TopSVD, randomized_svd
from lora_one.targets import find_target_linears

MODES = ("accumulate", "single-batch", "sketch")
# Sketch passes when none are asked for. On SmolLM2 (N = 64, r = 8) one pass left a top-8 subspace
# sine of 0.2 (median) where two gave at most 4.5e-3 over 70 layers, for 1.6x a LoRA epoch's time
# against 0.9x; three gave 5e-4 for 2.9x (benchmarks/results/init_cost.txt).
DEFAULT_SKETCH_PASSES = 2


def _refuse_sharded_weights(model: nn.Module, weights: dict[str, nn.Parameter]) -> None:
    sharded = any(type(m).__name__ in ("FullyShardedDataParallel", "FSDPModule") for m in model.modules())
    for w in weights.values():
        sharded |= hasattr(w, "ds_id") or type(w.data).__name__ == "DTensor"
    if sharded:
        raise UsageError(
            "The target weights are sharded (FSDP or DeepSpeed ZeRO-3), which estimate_gradients does "
            "not gather. Supported: one process, or data parallelism with full weights on every rank "
            "(torchrun/DDP, accelerate's multi-GPU). Run the LoRA-One init on the unsharded model, "
            "then wrap it for FSDP/ZeRO-3 training."
        )


@contextmanager
def _estimation_state(model: nn.Module, weights: dict[str, nn.Parameter], weights_need_grad: bool):
    """Freeze everything (but the targets, if they take gradients), dropout off; restore afterwards."""
    flags = {p: p.requires_grad for p in model.parameters()}
    modes = {m: m.training for m in model.modules()}
    old_grads = {p: p.grad for p in weights.values()}  # a user's pending .grad must not leak into G
    try:
        for p in flags:
            p.requires_grad_(False)
        if weights_need_grad:
            for p in weights.values():
                p.requires_grad_(True)
                p.grad = None
        model.eval()
        yield
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
        for p, grad in old_grads.items():
            p.grad = grad
        for m, mode in modes.items():
            m.train(mode)


def _check(name: str, finite: bool, nonzero: bool) -> None:
    if not finite:
        raise UsageError(
            f"The gradient of {name!r} contains NaN or Inf (an overflow in low precision? load "
            "the model in float32) - check the weights and the data."
        )
    if not nonzero:
        raise UsageError(
            f"The gradient of {name!r} is exactly zero: the loss never reaches this layer. "
            "Leave it out of target_modules."
        )


class _Accumulate:
    weights_need_grad = True
    max_batches = None

    def __init__(self, targets, offload: bool, **_):
        self.sums = {
            n: torch.zeros(m.weight.shape, dtype=torch.float32, device="cpu" if offload else m.weight.device)
            for n, m in targets.items()
        }
        self.handles = [m.weight.register_post_accumulate_grad_hook(self._hook(n)) for n, m in targets.items()]

    def _hook(self, name):
        def hook(param):
            self.sums[name].add_(param.grad.to(self.sums[name].device))
            param.grad = None  # free the raw gradient at once

        return hook

    def finish(self, n_batches: int) -> dict[str, torch.Tensor]:
        out = {}
        for name, total in self.sums.items():
            g = all_reduce_sum(total).div_(n_batches)
            _check(name, bool(torch.isfinite(g).all()), bool(g.any()))
            out[name] = g
        return out


class _SingleBatch:
    weights_need_grad = True
    max_batches = 1

    def __init__(self, targets, rank: int, seed: int, **_):
        self.rank, self.seed, self.svds = rank, seed, {}
        self.world = world_size()
        self.handles = [m.weight.register_post_accumulate_grad_hook(self._hook(n)) for n, m in targets.items()]

    def _hook(self, name):
        def hook(param):
            g = all_reduce_sum(param.grad.float()).div_(self.world)
            param.grad = None
            _check(name, bool(torch.isfinite(g).all()), bool(g.any()))
            self.svds[name] = randomized_svd(g, self.rank, seed=self.seed)  # as init_lora_one seeds it

        return hook

    def finish(self, n_batches: int) -> dict[str, TopSVD]:
        return self.svds  # each hook already averaged its layer over the ranks


class _Sketch:
    """Pass 1 sketches with seeded Gaussian test matrices; `next_pass` swaps in refined sketches."""

    weights_need_grad = False
    max_batches = None

    def __init__(self, targets, rank: int, seed: int, oversample: int | None, model: nn.Module, **_):
        self.rank, self.sketches, self.handles = rank, {}, []
        shared: dict[tuple, torch.Tensor] = {}  # test matrices, one per (size, device)

        def matrix(rows: int, cols: int, device) -> torch.Tensor:
            key = (rows, cols, str(device))
            if key not in shared:
                shared[key] = test_matrix(rows, cols, seed * 1_000_003 + rows * 7919 + cols, device)
            return shared[key]

        for name, m in targets.items():
            out_f, in_f = m.weight.shape
            k, l = default_sizes(rank, out_f, in_f, oversample)
            dev = m.weight.device
            self.sketches[name] = GradientSketch.with_test_matrices(matrix(k, in_f, dev).mT, matrix(l, out_f, dev))
            self.handles.append(m.register_forward_hook(self._forward_hook(name)))
        embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        if embeddings is None:
            raise UsageError("mode='sketch' needs a model with get_input_embeddings() to start the backward.")
        # No weight takes a gradient, so make the embedding output a leaf of the graph: the backward
        # then computes input gradients only, as in LoRA training.
        self.handles.append(embeddings.register_forward_hook(lambda mod, args, out: out.requires_grad_(True)))

    def _forward_hook(self, name):
        def forward_hook(module, args, output):
            if not output.requires_grad:  # e.g. the first forward of activation checkpointing
                return
            x = args[0].detach()
            sketch = self.sketches[name]  # of the current pass
            output.register_hook(lambda g: sketch.add_tokens(g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1])))

        return forward_hook

    def _reduce(self, n_batches: int) -> None:
        """Sum the pass's sketches over the ranks and average them over the batches."""
        for name, sk in self.sketches.items():
            all_reduce_sum(sk.Y)
            all_reduce_sum(sk.W)
            sk.scale_(1.0 / n_batches)
            _check(name, bool(torch.isfinite(sk.Y).all() and torch.isfinite(sk.W).all()), bool(sk.Y.any()))

    def next_pass(self, n_batches: int) -> None:
        self._reduce(n_batches)  # every rank then builds the same next test matrices
        for name, sk in self.sketches.items():  # one layer at a time, freeing the old sketch at once
            self.sketches[name] = sk.next_pass()

    def finish(self, n_batches: int) -> dict[str, TopSVD]:
        self._reduce(n_batches)
        return {name: sk.top_svd(self.rank) for name, sk in self.sketches.items()}


def _to_device(batch: Mapping, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _backward_pass(model: nn.Module, batches: Iterable[Mapping], collector, mode: str, device, bar) -> int:
    """One forward and backward per batch, feeding the collector's hooks; returns this rank's batch count.
    The bar is updated by hand: `tqdm.auto` wrapping `batches` would iterate them twice (a DataLoader
    would start its workers twice and draw its seed twice from the global RNG)."""
    n_batches = 0
    for batch in batches:
        if "labels" not in batch:
            raise UsageError(
                "A batch has no 'labels': the one-step gradient needs the training loss. "
                "Add labels (for a causal LM, input_ids with the prompt and padding set to -100)."
            )
        if n_batches == collector.max_batches:
            raise UsageError(
                f"mode={mode!r} needs all init samples in one micro-batch per rank, got more "
                "batches; raise the batch size or use mode='accumulate' or 'sketch'."
            )
        loss = model(**_to_device(batch, device)).loss
        if loss is None:
            raise UsageError("The model returned no .loss for a batch that has labels.")
        if not torch.isfinite(loss):
            raise UsageError(f"The loss of batch {n_batches} is {loss.item()}; check the data and labels.")
        loss.backward()
        n_batches += 1
        bar.update(1)
    return n_batches


def _resolve_passes(passes, mode: str, batches) -> int:
    """The number of passes (`None`: the mode's default), checked."""
    if passes is None:
        passes = DEFAULT_SKETCH_PASSES if mode == "sketch" else 1
    if isinstance(passes, bool) or not isinstance(passes, int) or passes < 1:
        raise UsageError(f"passes must be an integer >= 1, got {passes!r}.")
    if passes > 1 and mode != "sketch":
        raise UsageError(
            f"passes={passes} (sketch passes) needs mode='sketch'; mode={mode!r} takes its gradient in one pass."
        )
    if passes > 1 and isinstance(batches, Iterator):  # a generator or other one-shot iterator
        raise UsageError(
            f"passes={passes} iterates the batches {passes} times, but they are a one-shot iterator "
            "(e.g. a generator); pass a list or a DataLoader."
        )
    return passes


def estimate_gradients(
    model: nn.Module,
    batches: Iterable[Mapping],
    target_modules=None,
    progress: bool = True,
    mode: str = "accumulate",
    offload: bool = False,
    rank: int | None = None,
    oversample: int | None = None,
    seed: int = 0,
    passes: int | None = None,
) -> dict[str, torch.Tensor | TopSVD]:
    """Mean over `batches` (and ranks) of `d model(**batch).loss / dW` for every target `nn.Linear`.

    Args:
        model: a transformers model, or a `PeftModel` (then the targets are the base layers of its LoRA
            layers and the gradient is taken at the model's current function).
        batches: an iterable of model-input dicts with `labels`, e.g. a DataLoader. Under
            `torch.distributed`, each rank passes its own shard. With `passes > 1`, a re-iterable
            (a list or a DataLoader) that yields the same samples each time, in any order.
        target_modules: what PEFT's `LoraConfig.target_modules` accepts; `"all-linear"` by default.
        mode: `accumulate` (default), `single-batch` or `sketch`, see the module docstring.
        offload: `accumulate` mode keeps its fp32 accumulators on CPU.
        rank, oversample, seed: the top-`rank` SVD of `single-batch` and `sketch` modes, the sketch's
            oversampling (`k = rank + oversample`, default `3 * rank`) and the test matrices' seed.
        passes: `sketch` mode's passes over the batches (default `DEFAULT_SKETCH_PASSES` = 2); each
            further pass is another forward and backward over all of them and sharpens the top-r
            subspace (README: sketch accuracy). Other modes take one.

    Returns:
        `{module name: G}` (fp32, `(out, in)`) in `accumulate` mode, `{module name: TopSVD of G}`
        otherwise. Names are those of the base model's `named_modules()`.
    """
    if mode not in MODES:
        raise UsageError(f"Unknown gradient mode {mode!r}; use one of {', '.join(MODES)}.")
    if mode != "accumulate" and not rank:
        raise UsageError(f"mode={mode!r} needs the LoRA rank (rank=r) to size its SVD.")
    passes = _resolve_passes(passes, mode, batches)
    targets = find_target_linears(model, target_modules)
    weights = {name: module.weight for name, module in targets.items()}
    _refuse_sharded_weights(model, weights)
    if mode != "sketch":
        for name, w in weights.items():
            if not w.dtype.is_floating_point:
                raise UsageError(
                    f"Layer {name!r} stores its weight as {w.dtype}, which cannot take a gradient (a "
                    "quantised base?). Use mode='sketch', which needs no weight gradient, or load the "
                    "model in float32/bfloat16."
                )
    device = next(iter(weights.values())).device
    collector_cls = {"accumulate": _Accumulate, "single-batch": _SingleBatch, "sketch": _Sketch}[mode]

    def total(n_batches: int) -> int:  # over the ranks, so that every rank raises alike
        return int(all_reduce_sum(torch.tensor([n_batches], dtype=torch.float64, device=device)).item())

    with _estimation_state(model, weights, collector_cls.weights_need_grad):
        collector = collector_cls(targets, offload=offload, rank=rank, seed=seed, oversample=oversample, model=model)
        try:
            for p in range(1, passes + 1):
                if p > 1:
                    collector.next_pass(n_total)
                desc = f"one-step gradient ({mode}" + (f", pass {p}/{passes})" if passes > 1 else ")")
                size = len(batches) if hasattr(batches, "__len__") else None
                with tqdm(total=size, desc=desc, unit="batch", disable=not (progress and is_main_process())) as bar:
                    n_pass = total(_backward_pass(model, batches, collector, mode, device, bar))
                if p > 1 and n_pass != n_total:
                    raise UsageError(
                        f"Pass {p} saw {n_pass} batches, pass 1 saw {n_total}: with passes > 1 the batches "
                        "must yield the same data each time; pass a list or a DataLoader."
                    )
                if n_pass == 0:
                    raise UsageError("No batches were given: the one-step gradient needs at least one training batch.")
                n_total = n_pass
        finally:
            for h in collector.handles:
                h.remove()
        return collector.finish(n_total)
