"""The teacher models and the training loop shared by the theory toys.

Layout is PEFT's throughout: a weight `W` is `(out, in) = (k, d)`, `lora_B` is `(k, r)`, `lora_A` is
`(r, d)` and the adapted weight is `base + s * B @ A` (the toys use `s = 1`). The paper writes its toy
as `y = x (W0 + A B)` with a row vector `x` and `W0` of shape `(d, k)`, i.e. our `W^T`; transposing
`W0 + A B` shows that the paper's `A` (`(d, r)`, input side, Gaussian at random init) is our
`lora_A^T` and the paper's `B` (`(r, k)`, output side, zero at random init) is our `lora_B^T`. Hence
the paper's "row space of B_t" is the column space of our `lora_B`, and "the left singular subspace
of G" (input side in the paper's layout) is the right singular subspace of our `G`.

`G` is always `dL/dW` of the training loss (the sign `lora_one.linalg.spectral.lora_factors` takes), so for
the linear toy `-G = Delta @ (X^T X / N)`, the paper's `(1/N) X^T (Y - X W0)` transposed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from lora_one.linalg.preconditioner import precondition
from lora_one.linalg.spectral import lora_factors

DTYPE = torch.float64  # the toys are tiny; float64 keeps round-off far below every effect we measure


def generator(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(seed)


def gaussian(shape: tuple[int, ...], gen: torch.Generator, std: float = 1.0) -> torch.Tensor:
    return torch.randn(shape, generator=gen, dtype=DTYPE) * std


def low_rank(out: int, inp: int, singular_values: Sequence[float], gen: torch.Generator) -> torch.Tensor:
    """A `(out, inp)` matrix with the given singular values and Haar-random singular vectors."""
    rank = len(singular_values)
    U = torch.linalg.qr(gaussian((out, rank), gen)).Q
    V = torch.linalg.qr(gaussian((inp, rank), gen)).Q
    return U @ torch.diag(torch.tensor(singular_values, dtype=DTYPE)) @ V.mT


def normalised(values: Sequence[float]) -> list[float]:
    """Singular values scaled so that the largest is 1 (the paper's `(4, 3, 2, 1)` normalised)."""
    top = max(values)
    return [v / top for v in values]


def geometric(kappa: float, rank: int) -> list[float]:
    """`rank` singular values from 1 down to `1 / kappa`, evenly spaced on a log scale."""
    if rank == 1:
        return [1.0]
    return [kappa ** (-i / (rank - 1)) for i in range(rank)]


@dataclass
class Teacher:
    """Gaussian inputs `X` `(N, d)`, labels from the teacher weight `W0 + delta` (`(k, d)`).

    `relu=False`: `y = (W0 + delta) x`; `relu=True`: `y = ReLU((W0 + delta) x)`. The training loss is
    `L(W) = 1/(2N) ||f_W(X) - Y||_F^2`, whose global minimiser is the teacher itself (no label noise).
    """

    X: torch.Tensor
    W0: torch.Tensor
    delta: torch.Tensor
    relu: bool = False
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def target(self) -> torch.Tensor:
        return self.W0 + self.delta

    def _forward(self, W: torch.Tensor) -> torch.Tensor:
        Z = self.X @ W.mT
        return Z.clamp_min(0) if self.relu else Z

    def grad(self, W: torch.Tensor) -> torch.Tensor:
        """`dL/dW` (full batch)."""
        N = self.X.shape[0]
        if not self.relu:  # (W - W*) Sigma_hat: only d x d work per step
            if "sigma" not in self._cache:
                self._cache["sigma"] = self.X.mT @ self.X / N
            return (W - self.target) @ self._cache["sigma"]
        if "Y" not in self._cache:
            self._cache["Y"] = self._forward(self.target)
        Z = self.X @ W.mT
        R = (Z.clamp_min(0) - self._cache["Y"]) * (Z > 0)
        return R.mT @ self.X / N

    def resampled(self, n: int, gen: torch.Generator) -> Teacher:
        """The same teacher with `n` fresh samples."""
        return Teacher(gaussian((n, self.X.shape[1]), gen), self.W0, self.delta, self.relu)

    def one_step_gradient(self) -> torch.Tensor:
        """`G = dL/dW` at the pretrained weight `W0`: what LoRA-One's init takes."""
        return self.grad(self.W0)


def make_teacher(
    d: int,
    k: int,
    n: int,
    singular_values: Sequence[float],
    gen: torch.Generator,
    relu: bool = False,
) -> Teacher:
    """Pretrained `W0` with `N(0, 1/d)` entries, a low-rank shift `delta`, `n` samples `x ~ N(0, I_d)`.

    `W0` is rounded to fp32 values, so that an fp32 PEFT layer holds it exactly.
    """
    W0 = gaussian((k, d), gen, 1 / math.sqrt(d)).float().to(DTYPE)
    delta = low_rank(k, d, singular_values, gen)
    X = gaussian((n, d), gen)
    return Teacher(X=X, W0=W0, delta=delta, relu=relu)


@dataclass
class Adapter:
    """A LoRA pair on a (possibly modified) base weight: the effective weight is `base + s B A`."""

    B: torch.Tensor  # (k, r)
    A: torch.Tensor  # (r, d)
    base: torch.Tensor  # (k, d)
    scale: float = 1.0

    @property
    def weight(self) -> torch.Tensor:
        return self.base + self.scale * self.B @ self.A

    def copy(self) -> Adapter:
        return Adapter(self.B.clone(), self.A.clone(), self.base.clone(), self.scale)


def random_adapter(
    teacher: Teacher,
    r: int,
    alpha2: float,
    gen: torch.Generator | None = None,
    direction: torch.Tensor | None = None,
) -> Adapter:
    """The usual LoRA init: `lora_A` Gaussian, `lora_B = 0`, base unchanged.

    Entries of `lora_A` have variance `alpha2 / d`, so each of its rows has squared norm `alpha2` in
    expectation (the paper's A is our `lora_A^T`). `direction` (entries `N(0, 1/d)`, drawn from `gen`
    when not given) lets runs that differ only in `alpha2` share one Gaussian draw.
    """
    k, d = teacher.W0.shape
    if direction is None:
        direction = gaussian((r, d), gen, 1 / math.sqrt(d))
    return Adapter(B=torch.zeros(k, r, dtype=DTYPE), A=math.sqrt(alpha2) * direction, base=teacher.W0.clone())


def spectral_adapter(teacher: Teacher, r: int, variant: str, gamma: float) -> Adapter:
    """`lora_one.linalg.spectral.lora_factors` on the teacher's one-step gradient (exact SVD, base unchanged)."""
    B, A = lora_factors(teacher.one_step_gradient(), r, variant, gamma, svd="exact")
    return Adapter(B=B.to(DTYPE), A=A.to(DTYPE), base=teacher.W0.clone())


def risk(teacher: Teacher, adapter: Adapter) -> float:
    """`0.5 ||W_eff - (W0 + Delta)||_F^2`, i.e. `0.5 ||s B A - Delta||_F^2` when the base is `W0`."""
    return 0.5 * float((adapter.weight - teacher.target).square().sum())


@dataclass
class Trace:
    """Per-step records of one run: `risk[t]` and any extra metrics, `t = 0..steps`."""

    risk: list[float] = field(default_factory=list)
    extra: dict[str, list[float]] = field(default_factory=dict)
    diverged: bool = False

    def record(self, name: str, value: float) -> None:
        self.extra.setdefault(name, []).append(value)


def train(
    teacher: Teacher,
    adapter: Adapter,
    steps: int,
    lr: float,
    reg: float | None = None,
    observe: Callable[[int, Adapter, Trace], None] | None = None,
    stop_below: float | None = None,
) -> Trace:
    """Full-batch GD on `(lora_A, lora_B)`; with `reg` set, preconditioned GD via
    `lora_one.linalg.preconditioner.precondition` (grads times `(B^T B + reg I)^-1` / `(A A^T + reg I)^-1`).

    Trains `adapter` in place. `observe(t, adapter, trace)` runs after the risk of step `t` is logged.
    Stops early once the risk is `<= stop_below`, or (setting `trace.diverged`) once it is not finite.
    """
    trace = Trace()
    s = adapter.scale
    for t in range(steps + 1):
        value = risk(teacher, adapter)
        trace.risk.append(value)
        if observe is not None:
            observe(t, adapter, trace)
        if not math.isfinite(value):
            trace.diverged = True
            break
        if t == steps or (stop_below is not None and value <= stop_below):
            break
        gW = teacher.grad(adapter.weight)
        grad_B = s * gW @ adapter.A.mT
        grad_A = s * adapter.B.mT @ gW
        if reg is not None:
            grad_A, grad_B = precondition(adapter.A, adapter.B, grad_A, grad_B, reg)
        adapter.A = adapter.A - lr * grad_A
        adapter.B = adapter.B - lr * grad_B
    return trace


def first_step_below(values: Sequence[float], threshold: float) -> int | None:
    """The first index whose value is `<= threshold`, or None."""
    return next((t for t, v in enumerate(values) if v <= threshold), None)


def fit_line(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float, float]:
    """Least-squares line `y = slope x + intercept` through the points: `(slope, intercept, R^2)`."""
    x, y = torch.tensor(xs, dtype=DTYPE), torch.tensor(ys, dtype=DTYPE)
    xc, yc = x - x.mean(), y - y.mean()
    slope = float((xc * yc).sum() / xc.square().sum())
    r2 = 1.0 - float((yc - slope * xc).square().sum() / yc.square().sum())
    return slope, float(y.mean()) - slope * float(x.mean()), r2
