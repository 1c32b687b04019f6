"""Step 1 of LoRA-One: the one-step full fine-tuning gradient of every target weight.

`G = dL/dW` at the current weights, where `L` is the mean loss over ALL supervised terms of the N init
samples (shared/ALGORITHM.md, Step 1): for a causal LM, the token cross-entropy summed over every
predicted label token of the N examples (labels shift by one: `labels[..., 1:] != -100` count), divided
by their number; for an encoder-decoder (`config.is_encoder_decoder`) or token classification the same
without the shift (`labels != -100`); for sequence classification, the mean over the examples. That is
exactly one full-batch step over the N samples, and `transformers.Trainer`'s convention
(`num_items_in_batch`). So each micro-batch's `.loss` (the mean over its own terms) is backpropagated
times `its terms / the terms of all micro-batches of all ranks`, and `G` is the same, to fp32 round-off,
for every micro-batch size, a short last batch, every memory mode and every number of ranks.

The samples are materialised first: this rank's share of `init_samples` examples (the last batch sliced
if it straddles the boundary), kept in a list, so that a shuffling DataLoader or a generator works and
every sketch pass sees the same samples. Three memory modes:

- `accumulate`: only the target weights take a gradient; each is moved into an fp32 accumulator (on
  the weight's device, or on CPU with `offload=True`) by a post-accumulate-grad hook as soon as autograd
  produces it, so at most one raw layer gradient lives beside the accumulators. Returns `G` per layer.
  Under `torch.distributed` an offloaded accumulator is summed over the ranks on the weight's device,
  one layer at a time (NCCL reduces GPU tensors only).
- `single-batch`: for one micro-batch per rank holding all its samples, each layer's gradient is
  all-reduced and its top-r SVD (of the layer's own rank) taken inside its hook, the gradient dropped at
  once. Returns a `TopSVD` per layer.
- `sketch`: never forms a weight gradient. For `y = x W^T`, `G = sum_t g_t^T x_t`; forward hooks keep
  the layer inputs `x`, tensor hooks on the outputs receive `g = dL/dy`, and both feed the linear
  sketches `G @ Omega`, `Psi @ G` (`lora_one.linalg.sketch`). The base weights need no `requires_grad`, so a
  frozen or quantised base works and the backward costs what a LoRA training step's backward costs.
  `sketch_passes > 1` runs the samples again, each pass sketching with test matrices built from the previous
  pass's all-reduced sketches (subspace iteration): more accurate for slowly decaying spectra, at one
  forward and backward over the data per pass. Returns a `TopSVD` per layer.

The model runs in training mode, so that gradient checkpointing (which transformers applies only in
training mode) saves its memory here too, with every dropout probability set to 0; afterwards it is
exactly as it was found: weights, `requires_grad` flags, train/eval mode, dropout settings, `.grad`.

Under `torch.distributed`, a `UsageError` on one rank (a batch without labels, a non-finite loss, too
few samples) is raised on every rank with the same message before the next collective
(`parallel.raise_together`), so no rank is left waiting for another.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedConfig
from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss

from lora_one.core.config import check_grad_mode, check_init_samples, resolve_sketch_passes
from lora_one.core.constants import DEFAULT_INIT_SAMPLES
from lora_one.core.deprecation import deprecated_arguments
from lora_one.core.errors import UsageError
from lora_one.core.gradcache import GradientCache, key_fields
from lora_one.core.parallel import all_reduce_sum, is_main_process, raise_together, world_size
from lora_one.core.parallel import process_index as process_rank
from lora_one.core.targets import base_model_of, find_target_linears
from lora_one.linalg.sketch import GradientSketch, default_sizes, test_matrix
from lora_one.linalg.spectral import TopSVD, randomized_svd

IGNORE_INDEX = -100
# Parts of the names of the float settings that transformers modules (or their configs) read as a
# probability of dropping something in training mode: attention_dropout, layerdrop, drop_path's
# drop_prob, MoE router jitter, ...
_DROPOUT_NAMES = ("dropout", "drop_prob", "drop_rate", "layerdrop", "attn_drop", "jitter")

TrainStep = Callable[[nn.Module, dict], torch.Tensor]


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


def _dropout_settings(model: nn.Module) -> list[tuple[object, str]]:
    """`(owner, attribute)` of every non-zero dropout probability the model reads in training mode:
    `nn.Dropout.p`, and numbers such as `attention_dropout` or `layerdrop` on modules and their configs."""
    found, owners = [], {}
    for m in model.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.p:
            found.append((m, "p"))
        owners[id(m)] = m
        if isinstance(getattr(m, "config", None), PreTrainedConfig):
            owners[id(m.config)] = m.config
    for owner in owners.values():
        for name, value in vars(owner).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value and any(
                part in name for part in _DROPOUT_NAMES
            ):
                found.append((owner, name))
    return found


@contextmanager
def _estimation_state(model: nn.Module, weights: dict[str, nn.Parameter], weights_need_grad: bool):
    """Freeze everything (but the targets, if they take gradients); training mode, so that gradient
    checkpointing is active, with every dropout probability at 0; restore all of it afterwards."""
    flags = {p: p.requires_grad for p in model.parameters()}
    modes = {m: m.training for m in model.modules()}
    dropouts = [(owner, name, getattr(owner, name)) for owner, name in _dropout_settings(model)]
    old_grads = {p: p.grad for p in weights.values()}  # a user's pending .grad must not leak into G
    try:
        for p in flags:
            p.requires_grad_(False)
        if weights_need_grad:
            for p in weights.values():
                p.requires_grad_(True)
                p.grad = None
        model.train()
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()  # its running statistics must not move
        for owner, name, _ in dropouts:
            setattr(owner, name, 0.0)
        yield
    finally:
        for owner, name, value in dropouts:
            setattr(owner, name, value)
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
    reduces_in_backward = False

    def __init__(self, targets, offload: bool, **_):
        self.devices = {n: m.weight.device for n, m in targets.items()}
        self.sums = {
            n: torch.zeros(m.out_features, m.in_features, dtype=torch.float32,
                           device="cpu" if offload else self.devices[n])
            for n, m in targets.items()
        }
        self.handles = [m.weight.register_post_accumulate_grad_hook(self._hook(n)) for n, m in targets.items()]

    def _hook(self, name):
        def hook(param):
            self.sums[name].add_(param.grad.to(self.sums[name].device))
            param.grad = None  # free the raw gradient at once

        return hook

    def finish(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, total in self.sums.items():
            # each rank's part is already weighted by its share of the loss terms
            g = all_reduce_sum(total, self.devices[name])
            _check(name, bool(torch.isfinite(g).all()), bool(g.any()))
            out[name] = g
        return out


class _SingleBatch:
    weights_need_grad = True
    reduces_in_backward = True  # the all-reduces run inside the backward hooks

    def __init__(self, targets, ranks: Mapping[str, int], seed: int, **_):
        self.ranks, self.seed, self.svds = ranks, seed, {}
        self.handles = [m.weight.register_post_accumulate_grad_hook(self._hook(n)) for n, m in targets.items()]

    def _hook(self, name):
        def hook(param):
            g = all_reduce_sum(param.grad.float())
            param.grad = None
            _check(name, bool(torch.isfinite(g).all()), bool(g.any()))
            self.svds[name] = randomized_svd(g, self.ranks[name], seed=self.seed)  # as init_lora_one seeds it

        return hook

    def finish(self) -> dict[str, TopSVD]:
        return self.svds  # each hook already summed its layer over the ranks


class _Sketch:
    """Pass 1 sketches with seeded Gaussian test matrices; `next_pass` swaps in refined sketches."""

    weights_need_grad = False
    reduces_in_backward = False

    def __init__(self, targets, ranks: Mapping[str, int], seed: int, oversample: int | None, model: nn.Module, **_):
        self.ranks, self.sketches, self.handles = ranks, {}, []
        shared: dict[tuple, torch.Tensor] = {}  # test matrices, one per (size, device)

        def matrix(rows: int, cols: int, device) -> torch.Tensor:
            key = (rows, cols, str(device))
            if key not in shared:
                shared[key] = test_matrix(rows, cols, seed * 1_000_003 + rows * 7919 + cols, device)
            return shared[key]

        for name, m in targets.items():
            out_f, in_f = m.out_features, m.in_features  # a packed (e.g. 4-bit) weight has another shape
            k, l = default_sizes(ranks[name], out_f, in_f, oversample)
            dev = m.weight.device
            self.sketches[name] = GradientSketch.with_test_matrices(matrix(k, in_f, dev).mT, matrix(l, out_f, dev))
            self.handles.append(m.register_forward_hook(self._forward_hook(name)))
        embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        if embeddings is None:
            raise UsageError("grad_mode='sketch' needs a model with get_input_embeddings() to start the backward.")
        # No weight takes a gradient, so make the embedding output a leaf of the graph: the backward
        # then computes input gradients only, as in LoRA training. Every module sharing the embedding
        # weight (T5's encoder and decoder each hold their own module over `shared`) starts the graph.
        sharing = [m for m in model.modules()
                   if isinstance(m, nn.Embedding) and m is not embeddings and m.weight is embeddings.weight]
        for module in (embeddings, *sharing):
            self.handles.append(module.register_forward_hook(lambda mod, args, out: out.requires_grad_(True)))

    def _forward_hook(self, name):
        def forward_hook(module, args, output):
            if not output.requires_grad:  # e.g. the first forward of reentrant activation checkpointing
                return
            x = args[0].detach()
            sketch = self.sketches[name]  # of the current pass
            output.register_hook(lambda g: sketch.add_tokens(g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1])))

        return forward_hook

    def _reduce(self) -> None:
        """Sum the pass's sketches over the ranks (each rank's part is already weighted)."""
        for name, sk in self.sketches.items():
            all_reduce_sum(sk.Y)
            all_reduce_sum(sk.W)
            _check(name, bool(torch.isfinite(sk.Y).all() and torch.isfinite(sk.W).all()), bool(sk.Y.any()))

    def next_pass(self) -> None:
        self._reduce()  # every rank then builds the same next test matrices
        for name, sk in self.sketches.items():  # one layer at a time, freeing the old sketch at once
            self.sketches[name] = sk.next_pass()

    def finish(self) -> dict[str, TopSVD]:
        self._reduce()
        return {name: sk.top_svd(self.ranks[name]) for name, sk in self.sketches.items()}


def examples_in(batch: Mapping) -> int:
    """The number of examples in a batch: dim 0 of its `labels`, else of its `input_ids`, else of its
    first tensor."""
    if not isinstance(batch, Mapping):
        raise UsageError(
            f"A batch is a {type(batch).__name__}; pass dicts of model inputs (e.g. a DataLoader with a collator)."
        )
    for key in ("labels", "input_ids", *batch):
        value = batch.get(key)
        if isinstance(value, torch.Tensor) and value.ndim:
            return value.shape[0]
    raise UsageError(f"A batch holds no tensor with a batch dimension (keys {sorted(batch)}); pass model inputs.")


def _rows(batch: Mapping, start: int, stop: int, rows: int) -> dict:
    """Examples `start:stop` of a batch's `rows`: every tensor with that leading dimension, sliced."""
    return {
        k: v[start:stop] if isinstance(v, torch.Tensor) and v.ndim and v.shape[0] == rows else v
        for k, v in batch.items()
    }


class _Reader:
    """One pass over `batches`; a batch cut at the end of one share keeps its other examples for the next."""

    def __init__(self, batches: Iterable[Mapping]):
        self.batches, self.rest = iter(batches), None

    def __iter__(self):
        while True:
            if self.rest is not None:
                batch, self.rest = self.rest, None
            else:
                batch = next(self.batches, None)
                if batch is None:
                    return
            yield batch


def _take(reader: _Reader, init_samples: int | None, held_out: bool = False) -> list[dict]:
    """This rank's share of `init_samples` examples over all ranks, read from its own batches up to
    there and no further (all of them with `None`); the first `init_samples % world` ranks take one more.
    `held_out`: the share that follows the init samples, for the gamma search (only the message differs)."""
    if init_samples is None:
        samples = list(reader)
        for batch in samples:
            examples_in(batch)
        return samples
    world, me = world_size(), process_rank()
    share = init_samples // world + (me < init_samples % world)
    samples, have = [], 0
    if share:  # a rank whose share is 0 reads nothing
        for batch in reader:
            rows = examples_in(batch)
            if have + rows <= share:
                samples.append(batch)
            else:
                samples.append(_rows(batch, 0, share - have, rows))
                reader.rest = _rows(batch, share - have, rows, rows)
            have = min(have + rows, share)
            if have == share:
                break
    if have < share:
        where = f" asks this rank for {share} of them (over {world} ranks)," if world > 1 else ","
        if held_out:
            raise UsageError(
                f"The gamma search judges each step on init_samples={init_samples} training examples after the "
                f"init samples, held out from the gradient{where} but the batches hold only {have} more; pass more "
                "batches, or search_batches=... (search_batches=batches: on the init samples themselves)."
            )
        raise UsageError(
            f"init_samples={init_samples}{where} but the batches hold only {have} examples; pass more "
            "batches or lower init_samples (None uses every example given)."
        )
    return samples


def init_and_search_samples(batches: Iterable[Mapping], init_samples: int | None, device: torch.device,
                            search: bool = False, search_batches: Iterable[Mapping] | None = None
                            ) -> tuple[list[dict], list[dict]]:
    """The init samples and the gamma search's samples, read once, as lists: the one rule of
    `get_lora_one_model` and `LoraOneCallback` (and so of the command line, whose recipes hand
    `get_lora_one_model` the init samples followed by the search's).

    The init samples are this rank's share of the first `init_samples` examples of `batches` (every
    example with None). With `search`, the search's samples are this rank's share of the `init_samples`
    examples that follow them in `batches`, a batch cut between the two split, so that the step is judged
    on examples it was not fitted to; or, when given, every example of `search_batches`
    (`search_batches=batches`: the init samples themselves). Without `search` they are empty.

    Raises:
        UsageError: too few examples, or a search with `init_samples=None` and no `search_batches`; on
            every rank alike under `torch.distributed`.
    """
    if search and search_batches is None and init_samples is None:
        raise UsageError(
            "gamma search with init_samples=None: every example of batches is an init sample, and the search "
            "judges the step on other training examples; pass search_batches=... (search_batches=batches: on "
            "the init samples themselves), or a number of init samples."
        )
    with raise_together(device):
        reader = _Reader(batches)
        samples = _take(reader, init_samples)
        if not search:
            return samples, []
        if search_batches is batches:
            return samples, samples
        if search_batches is not None:
            return samples, _take(_Reader(search_batches), None)
        return samples, _take(reader, init_samples, held_out=True)


def _shifts_labels(model: nn.Module) -> bool:
    """Whether the loss predicts label t + 1 at position t (a causal LM), decided as
    `transformers.Trainer` decides it, plus GPT-2-style `*LMHeadModel`s, which have no `loss_type`."""
    base = base_model_of(model)
    if getattr(getattr(base, "config", None), "is_encoder_decoder", False):
        return False
    loss_type = getattr(base, "loss_type", None)
    return LOSS_MAPPING.get(loss_type) is ForCausalLMLoss or (
        loss_type is None and type(base).__name__.endswith("LMHeadModel")
    )


def _loss_terms(batch: Mapping, shifted: bool, train_step: TrainStep | None) -> int:
    """How many terms the batch's mean loss averages over."""
    labels = batch.get("labels")
    if labels is None:
        if train_step is None:
            raise UsageError(
                "A batch has no 'labels': the one-step gradient needs the training loss. Add labels (for a "
                "causal LM, input_ids with the prompt and padding set to -100), or pass train_step."
            )
        return examples_in(batch)  # the user's loss: one term per example
    if not isinstance(labels, torch.Tensor):
        raise UsageError(f"A batch's 'labels' is a {type(labels).__name__}; pass a tensor.")
    if labels.is_floating_point():  # regression, multi-label: the mean over every element
        return labels.numel()
    if shifted and labels.ndim > 1:
        labels = labels[..., 1:]
    return int((labels != IGNORE_INDEX).sum())


def _to_device(batch: Mapping, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _batch_loss(model: nn.Module, batch: Mapping, i: int, device, train_step: TrainStep | None) -> torch.Tensor:
    """The batch's mean loss (finite or not)."""
    batch = _to_device(batch, device)
    if train_step is None:
        loss = model(**batch).loss
        if loss is None:
            raise UsageError("The model returned no .loss for a batch that has labels; pass train_step.")
    else:
        loss = train_step(model, batch)
        if not (isinstance(loss, torch.Tensor) and loss.numel() == 1):
            raise UsageError(
                f"train_step returned {type(loss).__name__} {getattr(loss, 'shape', '')} for batch {i}; it "
                "must return the batch's mean loss as a scalar tensor."
            )
    return loss


def _loss(model: nn.Module, batch: Mapping, i: int, device, train_step: TrainStep | None) -> torch.Tensor:
    loss = _batch_loss(model, batch, i, device, train_step)
    if not torch.isfinite(loss):
        raise UsageError(f"The loss of batch {i} is {loss.item()}; check the data and labels.")
    return loss


@torch.no_grad()
def loss_sum(model: nn.Module, samples: list[Mapping], train_step: TrainStep | None = None) -> tuple[float, int]:
    """This rank's part of the loss `estimate_gradients` differentiates: the sum over `samples` of each
    batch's mean loss times its number of loss terms, and the number of those terms (summed over the
    ranks, their quotient is the mean over all loss terms). In eval mode, so no dropout of any kind;
    every module's mode is restored afterwards. A non-finite loss is returned as it is, for the caller
    to judge (a line search counts it as the worst)."""
    device = next(model.parameters()).device
    shifted = _shifts_labels(model)
    modes = {m: m.training for m in model.modules()}
    total, count = 0.0, 0
    try:
        model.eval()
        for i, batch in enumerate(samples):
            terms = _loss_terms(batch, shifted, train_step)
            if terms:  # a batch without loss terms adds nothing (and its mean loss is 0 / 0)
                total += float(_batch_loss(model, batch, i, device, train_step)) * terms
                count += terms
    finally:
        for m, mode in modes.items():
            m.train(mode)
    return total, count


def _backward_pass(model, samples, scales, collector, device, bar, train_step) -> None:
    """One forward and backward per batch, its mean loss times its share of all loss terms, feeding
    the collector's hooks. The bar is updated by hand: `tqdm.auto` wrapping an iterable would iterate it
    twice. Ranks agree on errors after the pass, or, where the backward itself all-reduces (single-batch,
    one batch per rank), on the loss before `backward()`."""
    if collector.reduces_in_backward:
        with raise_together(device):
            loss = _loss(model, samples[0], 0, device, train_step)
        (loss * scales[0]).backward()
        bar.update(1)
        return
    with raise_together(device):
        for i, (batch, scale) in enumerate(zip(samples, scales)):
            if scale:  # a batch without loss terms adds nothing (and its mean loss is 0 / 0)
                (_loss(model, batch, i, device, train_step) * scale).backward()
            bar.update(1)


def _layer_ranks(rank, targets: Mapping[str, nn.Module], grad_mode: str) -> dict[str, int] | None:
    """Each target's r for the top-r SVD of the SVD modes (None in `accumulate` mode): `rank`, or
    `rank[name]` for a mapping."""
    if grad_mode == "accumulate":
        return None
    if not isinstance(rank, Mapping):
        return dict.fromkeys(targets, rank)
    missing = [n for n in targets if n not in rank]
    if missing:
        raise UsageError(f"rank gives no r for the target layer {missing[0]!r}; map every target layer to its r, "
                         "or give one int for all.")
    return {n: rank[n] for n in targets}


@deprecated_arguments(old_positional=("target_modules", "progress", "mode", "offload", "rank", "oversample", "seed",
                                      "passes", "num_samples", "train_step", "cache_dir"))
def estimate_gradients(
    model: nn.Module,
    batches: Iterable[Mapping],
    *,
    target_modules: str | Sequence[str] | None = "all-linear",
    grad_mode: str = "accumulate",
    sketch_passes: int | None = None,
    init_samples: int | None = DEFAULT_INIT_SAMPLES,
    offload: bool = False,
    rank: int | Mapping[str, int] | None = None,
    oversample: int | None = None,
    seed: int = 0,
    grad_cache: str | os.PathLike | GradientCache | None = None,
    train_step: TrainStep | None = None,
    show_progress_bar: bool = True,
) -> dict[str, torch.Tensor | TopSVD]:
    """Step 1: `dL/dW` for every target `nn.Linear`, `L` the mean loss over all loss terms of the
    `init_samples` examples (of all ranks) read from `batches` (see the module docstring).

    The settings it shares with `get_lora_one_model` have the names of `LoraOneConfig`'s fields and are
    checked by the same functions.

    Args:
        model: a transformers model, or a `PeftModel` (then the targets are the base layers of its LoRA
            layers, the layers PEFT chose from its whole `LoraConfig`, and the gradient is taken at the
            model's current function).
        batches: an iterable of model-input dicts with `labels`, e.g. a DataLoader (shuffling or not) or
            a generator. Under `torch.distributed`, each rank passes its own.
        target_modules: what PEFT's `LoraConfig.target_modules` accepts, matched as PEFT matches it
            (`None`: PEFT's default for the architecture); `"all-linear"` by default.
        grad_mode: `accumulate` (default), `single-batch` or `sketch`, see the module docstring.
        sketch_passes: `sketch` mode's passes over the samples (None: `DEFAULT_SKETCH_PASSES`); each
            further pass is another forward and backward over all of them and sharpens the top-r
            subspace (docs/scaling.md#memory-modes). Other modes take one.
        init_samples: the number of examples used, over all ranks (default 8, the reference's N). Each
            rank reads its share (`init_samples // world`, the first `init_samples % world` ranks one
            more) from its own `batches` and stops there, slicing the last batch if it straddles the
            boundary. None: every example of `batches` (for callers that built exactly the init batches).
        offload: `accumulate` mode keeps its fp32 accumulators on CPU.
        rank: the r of the top-r SVD that `single-batch` and `sketch` modes return: one int, or
            `{layer name: r}` for every target (as PEFT's `rank_pattern` gives layers their own r).
        oversample: the sketch's oversampling, `k = r + oversample` (None: `3 * r`).
        seed: the seed of the sketch's test matrices and of `single-batch` mode's randomised SVD.
        grad_cache: a folder (or a `GradientCache`, whose `last` then says whether this call hit): the
            result is read from there when an entry with the same key exists (the backward skipped), else
            computed and stored (`lora_one.core.gradcache`: key, checks, ranks). Under `torch.distributed`
            every rank passes the same folder. Not with `train_step`.
        train_step: `train_step(model, batch) -> loss` replaces `model(**batch).loss` (the batch is on
            the model's device), so that `G` is the gradient of your own loss. The loss is taken as the
            batch's mean over its loss terms (counted as above; one per example for a batch without
            `labels`, which is then allowed) and weighted like the model's.
        show_progress_bar: print the sample count and show a progress bar (on the main process).

    Returns:
        `{module name: G}` (fp32, `(out, in)`) in `accumulate` mode, `{module name: TopSVD of G}`
        otherwise. Names are those of the base model's `named_modules()`.

    Raises:
        UsageError: a bad setting; too few examples, a batch without labels (and no `train_step`), a
            non-finite loss or a layer the loss never reaches; sharded or quantised target weights that
            the mode cannot take a gradient of. Under `torch.distributed`, on every rank alike.
    """
    check_grad_mode(grad_mode)
    if grad_mode != "accumulate" and not rank:
        raise UsageError(f"grad_mode={grad_mode!r} needs the LoRA rank (rank=r) to size its SVD.")
    sketch_passes = resolve_sketch_passes(sketch_passes, grad_mode)
    check_init_samples(init_samples)
    if grad_cache is not None and train_step is not None:
        raise UsageError(
            "grad_cache with train_step: a cache entry cannot tell one loss function from another, so it could "
            "hand back another loss's gradient; drop grad_cache (or train_step)."
        )
    cache = grad_cache if isinstance(grad_cache, GradientCache) or grad_cache is None else GradientCache(grad_cache)
    targets = find_target_linears(model, target_modules)
    layer_ranks = _layer_ranks(rank, targets, grad_mode)
    weights = {name: module.weight for name, module in targets.items()}
    _refuse_sharded_weights(model, weights)
    if grad_mode != "sketch":
        for name, w in weights.items():
            if not w.dtype.is_floating_point:
                raise UsageError(
                    f"Layer {name!r} stores its weight as {w.dtype}, which cannot take a gradient (a "
                    "quantised base?). Use grad_mode='sketch', which needs no weight gradient, or load the "
                    "model in float32/bfloat16."
                )
    device = next(iter(weights.values())).device
    collector_cls = {"accumulate": _Accumulate, "single-batch": _SingleBatch, "sketch": _Sketch}[grad_mode]

    shifted = _shifts_labels(model)
    with raise_together(device):
        samples = _take(_Reader(batches), init_samples)
        terms = [_loss_terms(b, shifted, train_step) for b in samples]
        if collector_cls.reduces_in_backward and len(samples) != 1:
            raise UsageError(
                f"grad_mode={grad_mode!r} needs exactly one micro-batch per rank, holding all of its init samples; "
                f"this rank has {len(samples)}. Give every rank one batch (raise the batch size), or use "
                "grad_mode='accumulate' or 'sketch'."
            )
    local = [sum(terms), sum(examples_in(b) for b in samples), len(samples)]
    # exact counts on the CPU (MPS has no float64), summed over the ranks on the model's device
    totals = all_reduce_sum(torch.tensor(local, dtype=torch.int64), device)
    n_terms, n_examples, n_batches = map(int, totals.tolist())
    if n_examples == 0:
        raise UsageError("No batches were given: the one-step gradient needs at least one training example.")
    if n_terms == 0:
        raise UsageError("The init samples have nothing to predict: every label is -100. Check the data and labels.")
    if show_progress_bar and is_main_process():
        ranks = f" over {world_size()} processes" if world_size() > 1 else ""
        print(f"one-step gradient: {n_examples} samples, {n_terms} loss terms, {n_batches} micro-batches{ranks}",
              flush=True)
    scales = [t / n_terms for t in terms]
    if cache is not None:
        fields = key_fields(model, targets, samples, grad_mode, seed, oversample, sketch_passes)
        cached = cache.lookup(fields, layer_ranks, targets, offload)
        if cached is not None:
            return cached

    with _estimation_state(model, weights, collector_cls.weights_need_grad):
        collector = collector_cls(targets, offload=offload, ranks=layer_ranks, seed=seed,
                                  oversample=oversample, model=model)
        try:
            for p in range(1, sketch_passes + 1):
                if p > 1:
                    collector.next_pass()
                desc = f"one-step gradient ({grad_mode}" + (f", pass {p}/{sketch_passes})" if sketch_passes > 1
                                                             else ")")
                with tqdm(total=len(samples), desc=desc, unit="batch",
                          disable=not (show_progress_bar and is_main_process())) as bar:
                    _backward_pass(model, samples, scales, collector, device, bar, train_step)
        finally:
            for h in collector.handles:
                h.remove()
        gradients = collector.finish()
    if cache is not None:
        cache.store(fields, layer_ranks, gradients)
    return gradients
