"""Pure math of the spectral initialisation: top-r SVD and the per-variant factor split.

No I/O, no PEFT, no nn.Module: tensors in, tensors out, so that every formula here is tested
against a dense `torch.linalg.svd` in milliseconds.

Layout is PEFT's: a weight `W` is `(out, in)`, `lora_B` is `(out, r)`, `lora_A` is `(r, in)` and the
adapted weight is `W + s * B @ A`. (The paper writes `W + A B`: its `A0` is our `B`, its `B0` our `A`.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lora_one.core.constants import DEFAULT_GAMMA, GRADIENT_VARIANTS, SVDS
from lora_one.core.errors import UsageError

# Randomised SVD defaults: q = r + max(r, MIN_OVERSAMPLE) columns, DEFAULT_NITER power iterations: enough
# that even a slowly decaying spectrum keeps the top-r subspace error near fp32 round-off
# (tests/test_spectral.py checks it); speed and accuracy on real gradients: docs/measurements.md#init-cost.
MIN_OVERSAMPLE = 16
DEFAULT_NITER = 4


@dataclass
class TopSVD:
    """The top-r singular triplets of a matrix: `M ~= U @ diag(S) @ Vh`."""

    U: torch.Tensor  # (m, r)
    S: torch.Tensor  # (r,), descending
    Vh: torch.Tensor  # (r, n)


def check_rank(shape: tuple[int, int], r: int, name: str = "matrix") -> None:
    if r < 1:
        raise UsageError(f"LoRA rank must be >= 1, got r={r}.")
    if r > min(shape):
        raise UsageError(
            f"LoRA rank r={r} is larger than the smallest dimension of {name} {tuple(shape)}; "
            f"use r <= {min(shape)} or leave this layer out of target_modules."
        )


def randomized_svd(
    M: torch.Tensor,
    r: int,
    oversample: int | None = None,
    niter: int = DEFAULT_NITER,
    seed: int = 0,
) -> TopSVD:
    """Top-r SVD by a seeded randomised range finder with power iterations (Halko et al. 2011).

    Unlike `torch.svd_lowrank`, the test matrix comes from an explicit CPU generator, so the result is
    the same on every device and every rank of a distributed job for the same seed.
    """
    m, n = M.shape
    check_rank((m, n), r)
    k = min(r + (oversample if oversample is not None else max(r, MIN_OVERSAMPLE)), m, n)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    omega = torch.randn(n, k, generator=gen, dtype=M.dtype).to(M.device)
    Q = torch.linalg.qr(M @ omega).Q
    for _ in range(niter):  # re-orthonormalise each half-step to keep small directions in fp32
        Q = torch.linalg.qr(M.mT @ Q).Q
        Q = torch.linalg.qr(M @ Q).Q
    Ub, S, Vh = torch.linalg.svd(Q.mT @ M, full_matrices=False)
    return TopSVD(U=(Q @ Ub)[:, :r], S=S[:r], Vh=Vh[:r])


def exact_svd(M: torch.Tensor, r: int) -> TopSVD:
    check_rank(tuple(M.shape), r)
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    return TopSVD(U=U[:, :r], S=S[:r], Vh=Vh[:r])


def top_svd(M: torch.Tensor, r: int, method: str = "randomized", seed: int = 0) -> TopSVD:
    if method == "randomized":
        return randomized_svd(M, r, seed=seed)
    if method == "exact":
        return exact_svd(M, r)
    raise UsageError(f"Unknown svd {method!r}; use one of {', '.join(SVDS)}.")


def canonical_signs(t: TopSVD) -> TopSVD:
    """Flip each singular pair `(u_i, v_i)` so that the largest-magnitude entry of `u_i` is positive.

    An SVD fixes each pair only up to a joint sign, and which sign comes out can flip under a rounding
    change (another number of processes, another device). The product is the same either way, but the
    factors, and so the trained adapter, would not be: this makes them a function of the matrix alone.
    """
    idx = t.U.abs().argmax(dim=0, keepdim=True)
    signs = torch.sign(t.U.gather(0, idx)).squeeze(0)
    signs[signs == 0] = 1
    return TopSVD(t.U * signs, t.S, signs[:, None] * t.Vh)


def subspace_sine(U1: torch.Tensor, U2: torch.Tensor) -> float:
    """Sine of the largest principal angle between the column spaces of U1 and U2 (orthonormal)."""
    U1, U2 = U1.double(), U2.double()
    residual = U2 - U1 @ (U1.mT @ U2)
    return float(torch.linalg.matrix_norm(residual, ord=2))


def lora_factors_and_spectrum(
    G: torch.Tensor | TopSVD,
    r: int,
    variant: str = "lora-one",
    gamma: float = DEFAULT_GAMMA,
    svd: str = "randomized",
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(lora_B, lora_A, S)` of one layer from its one-step gradient `G` (shape `(out, in)`), with `S`
    the top-r singular values of `G`. `G` may also be given as its top-r SVD (`TopSVD`, e.g. from the
    sketch mode of `estimate_gradients`); then `svd` and `seed` are not used.

    With `G = U S V^T` (so `-G = (-U) S V^T`):
    - `lora-one`: `B = -U_r sqrt(S_r) / sqrt(gamma S_0)`, `A = sqrt(S_r) V_r^T / sqrt(gamma S_0)`,
      so `B A = -G_r / (gamma S_0)`.
    - `spectral`: the same without the `S_0` normalisation, `B A = -G_r / gamma`.
    - `lora-one-v1`: `B = U_r out^(1/4) / sqrt(gamma)`, `A = V_r^T out^(1/4) / sqrt(gamma)`; the caller
      subtracts `s B A` from the base weight.

    Both factors of the first two are balanced (`B^T B == A A^T`), which the preconditioner likes.
    Each singular pair's sign follows `canonical_signs`. Works in fp32 whatever the dtype of `G`; the
    caller casts to the adapter's dtype.
    """
    if variant not in GRADIENT_VARIANTS:
        raise UsageError(f"lora_factors computes {GRADIENT_VARIANTS}, not {variant!r}.")
    if not gamma > 0:
        raise UsageError(f"gamma must be positive, got {gamma}.")
    if isinstance(G, TopSVD):
        if G.S.numel() < r:
            raise UsageError(f"the given SVD holds {G.S.numel()} triplets, fewer than r={r}.")
        t = TopSVD(G.U[:, :r].float(), G.S[:r].float(), G.Vh[:r].float())
    else:
        t = top_svd(G.float(), r, svd, seed)
    t = canonical_signs(t)
    if not t.S[0] > 0:
        raise UsageError("the gradient is zero: this layer does not affect the loss.")
    if variant == "lora-one-v1":
        scale = t.U.shape[0] ** 0.25 / gamma**0.5
        return t.U * scale, t.Vh * scale, t.S
    norm = gamma * t.S[0] if variant == "lora-one" else gamma
    root = (t.S / norm).sqrt()
    return -t.U * root, root[:, None] * t.Vh, t.S


def lora_factors(G: torch.Tensor | TopSVD, r: int, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """`(lora_B, lora_A)` only; see `lora_factors_and_spectrum` for the arguments and formulas."""
    B, A, _ = lora_factors_and_spectrum(G, r, *args, **kwargs)
    return B, A
