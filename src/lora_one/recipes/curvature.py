"""Step-0 curvature: the top eigenvalue of the loss Hessian with respect to the trainable parameters.

The loss is the one the library takes everywhere (`lora_one.core.gradients`): the mean over every loss
term of the init samples (label tokens, shifted for a causal LM; examples for a classifier), so each
micro-batch's mean loss is weighted by its share of all the terms, and the result does not depend on
how the samples are cut into micro-batches. The Hessian is never formed: power iteration multiplies by
it through Hessian-vector products, `H v = d/dθ <dL/dθ, v>` (double backward: the first gradient with
`create_graph=True`), summed over the micro-batches, one batch's graph alive at a time.

Power iteration from a seeded Gaussian start converges to the eigenvector of the eigenvalue largest in
magnitude (its sign kept: a negative one is returned as negative). Each iteration gives the Rayleigh
quotient `λ = <v, Hv>` of the unit iterate and its residual `|Hv - λv|`; the iteration stops when the
residual is at most `tol |λ|`. Then some eigenvalue of H lies within `tol |λ|` of λ, whatever the
spectrum's gaps (Krylov-Weinstein: for symmetric H and unit v, an eigenvalue lies within the residual of
the Rayleigh quotient), and λ itself is usually far closer (its error is the residual squared over the
gap). When the two ends of the spectrum have nearly the same magnitude (a plain LoRA adapter at B = 0
has a Hessian whose A-B block is the gradient, which gives eigenvalue pairs near ±s·σ(G)), the
iteration converges slowly or not at all: `converged` says so, and the last λ is returned; `|Hv|` of the unit
iterate, also returned, is a lower bound of the largest |eigenvalue| that converges to it all the same (the two
ends then have nearly the same magnitude).

The model runs in eval mode (no dropout of any kind) with PyTorch's math attention kernel (the fused
ones need not be twice differentiable); modes are restored afterwards and no `.grad` is touched.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from lora_one.core.errors import UsageError
from lora_one.core.gradients import TrainStep, _batch_loss, _loss_terms, _shifts_labels


@dataclass
class Curvature:
    eigenvalue: float  # the Rayleigh quotient of the last iterate: the eigenvalue largest in magnitude, signed
    iterations: int  # Hessian-vector products taken
    converged: bool  # residual <= tol * |eigenvalue|
    residual: float  # |H v - eigenvalue v| of the last (unit) iterate: an eigenvalue lies within it
    norm: float  # |H v| of the last unit iterate: at most the largest |eigenvalue|, and converging to it
    parameters: int  # the dimension of H
    loss: float  # the loss at which H was taken
    seconds: float

    def as_dict(self) -> dict:
        return asdict(self)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every parameter that takes a gradient: a PEFT model's adapter (and any modules_to_save)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise UsageError("The model has no trainable parameter: the Hessian is taken with respect to the trainable "
                         "(adapter) parameters; wrap it with PEFT first.")
    return params


def _dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    """`<a, b>` over all the tensors, summed in float64 (as exact as the vectors allow)."""
    return math.fsum(float((x.double() * y.double()).sum()) for x, y in zip(a, b))


def _weights(model: nn.Module, batches: Sequence[Mapping], train_step: TrainStep | None) -> list[float]:
    """Each micro-batch's share of the loss terms of all of them (`estimate_gradients`' weighting)."""
    shifted = _shifts_labels(model)
    terms = [_loss_terms(b, shifted, train_step) for b in batches]
    total = sum(terms)
    if total == 0:
        raise UsageError("The samples have nothing to predict: every label is -100. Check the data and labels.")
    return [t / total for t in terms]


@contextmanager
def _hessian_state(model: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout of any kind) and the math attention kernel, which is twice differentiable
    (CPU's fused flash kernel has no derivative of its backward); every module's mode restored after."""
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with sdpa_kernel([SDPBackend.MATH]):
            yield
    finally:
        for m, mode in modes.items():
            m.train(mode)


class HessianOperator:
    """`H v` of the weighted mean loss over `batches` with respect to `params`, and the loss itself."""

    def __init__(self, model: nn.Module, batches: Iterable[Mapping], params: Sequence[nn.Parameter] | None = None,
                 train_step: TrainStep | None = None):
        self.model, self.train_step = model, train_step
        self.batches = list(batches)
        if not self.batches:
            raise UsageError("No batches were given: the Hessian needs at least one example.")
        self.params = list(params) if params is not None else trainable_parameters(model)
        self.weights = _weights(model, self.batches, train_step)
        self.device = self.params[0].device
        self.loss = float("nan")

    def __call__(self, vector: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        with _hessian_state(self.model):
            return self._product(vector)

    def _product(self, vector: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        out = [torch.zeros_like(p) for p in self.params]
        loss = 0.0
        for i, (batch, weight) in enumerate(zip(self.batches, self.weights)):
            if not weight:  # no loss terms: nothing to add (and its mean loss is 0 / 0)
                continue
            value = _batch_loss(self.model, batch, i, self.device, self.train_step) * weight
            if not torch.isfinite(value):
                raise UsageError(f"The loss of batch {i} is not finite; check the data and labels.")
            loss += float(value.detach())
            grads = torch.autograd.grad(value, self.params, create_graph=True, allow_unused=True)
            inner = sum((g * v).sum() for g, v in zip(grads, vector) if g is not None)
            if not isinstance(inner, torch.Tensor) or not inner.requires_grad:
                continue  # the loss is linear (or constant) in every parameter: this batch adds 0
            hv = torch.autograd.grad(inner, self.params, allow_unused=True)
            for acc, h in zip(out, hv):
                if h is not None:
                    acc.add_(h.detach())
        self.loss = loss
        return out


def top_hessian_eigenvalue(
    model: nn.Module,
    batches: Iterable[Mapping],
    params: Sequence[nn.Parameter] | None = None,
    tol: float = 1e-3,
    max_iter: int = 100,
    seed: int = 0,
    train_step: TrainStep | None = None,
) -> Curvature:
    """The eigenvalue of largest magnitude of the Hessian of the mean loss over all loss terms of
    `batches` (micro-batches of model inputs with `labels`, e.g. the init samples) with respect to
    `params` (default: every trainable parameter), by power iteration from a Gaussian start drawn with
    `seed`; stops when `|Hv - λv| <= tol |λ|` or after `max_iter` Hessian-vector products (see the module
    docstring). `train_step(model, batch) -> mean loss` replaces `model(**batch).loss`."""
    if not tol > 0 or max_iter < 1:
        raise UsageError(f"tol must be > 0 and max_iter >= 1, got {tol} and {max_iter}.")
    t0 = time.perf_counter()
    H = HessianOperator(model, batches, params, train_step)
    g = torch.Generator().manual_seed(seed)
    v = [torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.device, p.dtype) for p in H.params]
    norm = math.sqrt(_dot(v, v))
    v = [x / norm for x in v]
    lam, residual, norm, converged, k = 0.0, math.inf, 0.0, False, 0
    with _hessian_state(model):
        for k in range(1, max_iter + 1):
            w = H._product(v)
            lam = _dot(v, w)
            residual = math.sqrt(math.fsum(float((a.double() - lam * b.double()).square().sum())
                                           for a, b in zip(w, v)))
            norm = math.sqrt(_dot(w, w))
            if residual <= tol * abs(lam):  # also H v = 0 (then H = 0, almost surely)
                converged = True
                break
            v = [x / norm for x in w]
    n = sum(p.numel() for p in H.params)
    return Curvature(eigenvalue=lam, iterations=k, converged=converged, residual=residual, norm=norm, parameters=n,
                     loss=H.loss, seconds=round(time.perf_counter() - t0, 3))
