"""Step 1 of LoRA-One: the one-step full fine-tuning gradient of every target weight.

`G = dL/dW` at the current weights, averaged over the given batches, where `L` is the model's own
`.loss`. Only the target weights take a gradient; each is moved into an fp32 accumulator by a
post-accumulate-grad hook as soon as autograd produces it, so at most one raw layer gradient lives
beside the accumulators. The model is left exactly as it was found.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from contextlib import contextmanager

import torch
from torch import nn
from tqdm.auto import tqdm

from lora_one.targets import find_target_linears


@contextmanager
def _only_targets_require_grad(model: nn.Module, weights: dict[str, nn.Parameter]):
    """Freeze everything but `weights`, turn dropout off; restore flags and mode afterwards."""
    flags = {p: p.requires_grad for p in model.parameters()}
    modes = {m: m.training for m in model.modules()}
    old_grads = {p: p.grad for p in weights.values()}  # a user's pending .grad must not leak into G
    try:
        for p in flags:
            p.requires_grad_(False)
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


def _to_device(batch: Mapping, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def estimate_gradients(
    model: nn.Module,
    batches: Iterable[Mapping],
    target_modules=None,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Mean over `batches` of `d model(**batch).loss / dW` for every target `nn.Linear` weight.

    Args:
        model: a transformers model, or a `PeftModel` (then the targets are the base layers of its LoRA
            layers and the gradient is taken at the model's current function).
        batches: an iterable of model-input dicts with `labels`, e.g. a DataLoader.
        target_modules: what PEFT's `LoraConfig.target_modules` accepts; `"all-linear"` by default.

    Returns:
        `{module name: fp32 gradient of shape (out, in)}`. Names are those of the base model's
        `named_modules()` (for a plain model, its own names), the names PEFT's target matching sees.
    """
    targets = find_target_linears(model, target_modules)
    weights = {name: module.weight for name, module in targets.items()}
    for name, w in weights.items():
        if not w.dtype.is_floating_point:
            raise ValueError(
                f"Layer {name!r} stores its weight as {w.dtype}, which cannot take a gradient (a "
                "quantised base?). Load the model in float32/bfloat16 for the LoRA-One init, or "
                "leave this layer out of target_modules."
            )
    device = next(iter(weights.values())).device
    sums = {name: torch.zeros(w.shape, dtype=torch.float32, device=w.device) for name, w in weights.items()}

    def make_hook(name: str):
        def hook(param: torch.Tensor) -> None:
            sums[name].add_(param.grad)
            param.grad = None  # free the raw gradient at once

        return hook

    n_batches = 0
    with _only_targets_require_grad(model, weights):
        handles = [w.register_post_accumulate_grad_hook(make_hook(n)) for n, w in weights.items()]
        try:
            for batch in tqdm(batches, desc="one-step gradient", unit="batch", disable=not progress):
                if "labels" not in batch:
                    raise ValueError(
                        "A batch has no 'labels': the one-step gradient needs the training loss. "
                        "Add labels (for a causal LM, input_ids with the prompt and padding set to -100)."
                    )
                loss = model(**_to_device(batch, device)).loss
                if loss is None:
                    raise ValueError("The model returned no .loss for a batch that has labels.")
                if not torch.isfinite(loss):
                    raise ValueError(f"The loss of batch {n_batches} is {loss.item()}; check the data and labels.")
                loss.backward()
                n_batches += 1
        finally:
            for h in handles:
                h.remove()
    if n_batches == 0:
        raise ValueError("No batches were given: the one-step gradient needs at least one training batch.")

    grads = {}
    for name, total in sums.items():
        g = total.div_(n_batches)
        if not torch.isfinite(g).all():
            raise ValueError(
                f"The gradient of {name!r} contains NaN or Inf (an overflow in low precision? load "
                "the model in float32) - check the weights and the data."
            )
        if not g.any():
            raise ValueError(
                f"The gradient of {name!r} is exactly zero: the loss never reaches this layer. "
                "Leave it out of target_modules."
            )
        grads[name] = g
    return grads
