"""Pure math of the randomised SVD sketch of a gradient: one pass (Tropp et al. 2017, Alg. 7), or
several passes of block subspace iteration, all without forming `G`.

Instead of `G` `(m, n)`, keep a range sketch `Y = G @ Omega` `(m, k)` and a co-range sketch
`W = Psi @ G` `(l, n)` with test matrices `Omega` `(n, k)`, `Psi` `(l, m)`. Both are linear in `G`, so
they can be summed over micro-batches, over tokens (`G = sum_t g_t^T x_t` for `y = x W^T`) and over
ranks. After one pass (Gaussian test matrices), `Q = orth(Y)`, `X = (Psi Q)^+ W` gives `G ~= Q X`, whose
SVD is cheap.

A further pass over the same data (`next_pass`) takes `Omega' = orth(W^T)` and `Psi' = orth(Y)^T`:
each side's basis gains one power of `G` per pass, two chains (of widths `k` and `l`) alternating
sides (so `k` and `l` swap places from pass to pass). With orthonormal test matrices `Q = Psi'^T` and
`P = Omega'`, the new sketches are the exact products `W' = Q^T G` and `Y' = G P`, and
`G ~= Q Q^T G + (I - Q Q^T) G P P^T` leaves the error `(I - Q Q^T) G (I - P P^T)`, a product of both
sides' residuals: more accurate than either side's projection alone.

Accuracy depends on how fast the spectrum of `G` decays beyond rank `k` and on the number of passes:
the measured subspace errors are in docs/scaling.md#memory-modes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lora_one.linalg.spectral import TopSVD, check_rank

# Device types without float64 (Apple's MPS): the sketch's float64 linear algebra runs on the CPU there.
NO_FLOAT64 = ("mps",)


def _float64(t: torch.Tensor) -> torch.Tensor:
    """`t` in float64: on its device, or on the CPU where the device has no float64 (moved, then cast)."""
    return (t.cpu() if t.device.type in NO_FLOAT64 else t).double()


def default_sizes(r: int, m: int, n: int, oversample: int | None = None) -> tuple[int, int]:
    """`(k, l)`: range and co-range sketch sizes for a top-`r` SVD of an `(m, n)` matrix.

    `k = r + oversample` (default `oversample = 3 r`), `l = 2 k + 1` as Tropp et al. recommend; both
    capped by the matrix size. How accurate one, two and three passes are with these sizes on real
    gradients is measured in docs/scaling.md#memory-modes (benchmarks/results/init_cost.txt).
    """
    check_rank((m, n), r)
    k = min(r + (3 * r if oversample is None else oversample), m, n)
    return k, min(2 * k + 1, m)


def test_matrix(rows: int, cols: int, seed: int, device=None) -> torch.Tensor:
    """A Gaussian matrix from a CPU generator: the same on every device and every rank."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(rows, cols, generator=gen).to(device)


@dataclass
class GradientSketch:
    """Linear sketches of one layer's gradient; `add_tokens` accumulates `sum_t g_t^T x_t`."""

    omega: torch.Tensor  # (n, k)
    psi: torch.Tensor  # (l, m)
    Y: torch.Tensor  # (m, k) = G @ omega
    W: torch.Tensor  # (l, n) = psi @ G
    orthonormal: bool = False  # test matrices with orthonormal columns / rows from a previous pass

    @classmethod
    def empty(cls, m: int, n: int, k: int, l: int, seed: int, device=None) -> GradientSketch:
        return cls.with_test_matrices(test_matrix(n, k, seed, device), test_matrix(l, m, seed + 1, device))

    @classmethod
    def with_test_matrices(
        cls, omega: torch.Tensor, psi: torch.Tensor, orthonormal: bool = False
    ) -> GradientSketch:
        """A zero sketch over given test matrices. Layers of the same shape may share Gaussian ones:
        each layer's sketch is still a valid Gaussian sketch, and memory stays O(distinct shapes)."""
        (n, k), (l, m) = omega.shape, psi.shape
        dev = omega.device
        return cls(omega, psi, torch.zeros(m, k, device=dev), torch.zeros(l, n, device=dev), orthonormal)

    def next_pass(self) -> GradientSketch:
        """A zero sketch for another pass over the same data, whose test matrices are orthonormal bases
        of this (complete, all-reduced) sketch: `Omega' = orth(W^T)`, `Psi' = orth(Y)^T`."""
        return GradientSketch.with_test_matrices(_orth(self.W.mT), _orth(self.Y).mT, orthonormal=True)

    def add_tokens(self, g: torch.Tensor, x: torch.Tensor, scale: float = 1.0) -> None:
        """Add `scale * g^T x` for output gradients `g` `(T, m)` and inputs `x` `(T, n)`, without ever
        forming the `(m, n)` product."""
        g, x = g.float(), x.float()
        self.Y.addmm_(g.mT, x @ self.omega, alpha=scale)
        self.W.addmm_(self.psi @ g.mT, x, alpha=scale)

    def add_matrix(self, G: torch.Tensor) -> None:
        self.Y.addmm_(G, self.omega)
        self.W.addmm_(self.psi, G)

    def scale_(self, factor: float) -> None:
        self.Y.mul_(factor)
        self.W.mul_(factor)

    def top_svd(self, r: int) -> TopSVD:
        """Top-r SVD of `G ~= basis @ core`, with `basis` orthonormal, so only `core` is decomposed."""
        Y, W = _float64(self.Y), _float64(self.W)
        if self.orthonormal:  # G ~= Q W + (Y - Q Q^T Y) P^T, see the module docstring
            Q, P = _float64(self.psi).mT, _float64(self.omega)
            # One QR of [Q, Y] (Q = basis R1, Y = basis R2) stays orthonormal even where the two
            # together hold more columns than G has rows.
            basis, R = torch.linalg.qr(torch.cat([Q, Y], dim=1))
            R1, R2 = R[:, : Q.shape[1]], R[:, Q.shape[1] :]
            core = R1 @ W + (R2 - R1 @ (Q.mT @ Y)) @ P.mT
        else:
            basis = torch.linalg.qr(Y).Q
            core = torch.linalg.lstsq(_float64(self.psi) @ basis, W).solution
        Ux, S, Vh = torch.linalg.svd(core, full_matrices=False)
        dev = self.Y.device  # cast, then moved
        return TopSVD(U=(basis @ Ux[:, :r]).float().to(dev), S=S[:r].float().to(dev), Vh=Vh[:r].float().to(dev))


def _orth(M: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of the columns of `M`, computed in float64 for the small directions."""
    return torch.linalg.qr(_float64(M)).Q.to(M.dtype).to(M.device)
