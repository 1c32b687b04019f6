"""The init formulas of ALGORITHM.md against a dense torch.linalg.svd."""

import pytest
import torch
from numerics import checked, relative_error, sum_tol, truncation_tol

from lora_one.linalg.spectral import TopSVD, exact_svd, lora_factors, randomized_svd, subspace_sine


def decaying_matrix(m=96, n=64, decay=0.7, seed=0):
    """A random matrix with singular values decay**i (a realistic gradient spectrum)."""
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64)).Q[:, : min(m, n)]
    V = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64)).Q[:, : min(m, n)]
    S = decay ** torch.arange(min(m, n), dtype=torch.float64)
    return (U * S) @ V.T


def dense_rank_r(M, r):
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    return U[:, :r] @ torch.diag(S[:r]) @ Vh[:r], S


@pytest.mark.parametrize("svd", ["exact", "randomized"])
@pytest.mark.parametrize("r", [1, 4, 8])
def test_lora_one_step0_identity(svd, r):
    G = decaying_matrix().float()
    W = torch.randn(G.shape)
    gamma, s = 128.0, 16 / r**0.5
    B, A = lora_factors(G, r, "lora-one", gamma, svd)
    Gr, S = dense_rank_r(G.double(), r)
    # a float32 SVD (the randomized one's power iterations converged far below round-off at this decay):
    # backward stable, G + E with |E| within a sum over a row and a column in each of its passes
    rel = (1 if svd == "exact" else 2 * 4 + 2) * sum_tol(sum(G.shape))
    assert relative_error(B @ A, -Gr / (gamma * S[0])) <= checked(truncation_tol(G, r, rel))
    # balanced factors: B^T B == A A^T == diag(S_r) / (gamma S_0), float32 sums over a side of at most 96;
    # each singular value within |E| (Weyl)
    atol = sum_tol(96) / gamma + rel * float(S.square().sum().sqrt()) / (gamma * S[0])
    torch.testing.assert_close(B.T @ B, A @ A.T, rtol=0, atol=2 * atol)
    torch.testing.assert_close(torch.diag(B.T @ B).double(), S[:r] / (gamma * S[0]), rtol=0, atol=atol)


def test_spectral_is_unnormalised():
    G = decaying_matrix().float() * 3.0
    B, A = lora_factors(G, 4, "spectral", gamma=2.0, svd="exact")
    Gr, S = dense_rank_r(G.double(), 4)
    rel = sum_tol(sum(G.shape))  # a float32 SVD: backward stable, as above
    assert relative_error(B @ A, -Gr / 2.0) <= checked(truncation_tol(G, 4, rel))
    torch.testing.assert_close(B.T @ B, A @ A.T, rtol=0, atol=2 * (sum_tol(96) + rel) * float(S[0]) / 2.0)


def test_lora_one_v1_factors():
    G = decaying_matrix(64, 48).float()
    gamma = 16.0
    B, A = lora_factors(G, 4, "lora-one-v1", gamma, "exact")
    U, _, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    # B A = out^(1/2)/gamma * U_r V_r^T, from the SVD of +G (signs of U and V flip together)
    expected = (64**0.5 / gamma) * U[:, :4] @ Vh[:4]
    # a float32 SVD, as above; U_r V_r^T moves with both subspaces (Wedin), not with the singular values
    S = torch.linalg.svdvals(G.double())
    E = sum_tol(sum(G.shape)) * float(S.square().sum().sqrt())
    tol = 2 * 2**0.5 * E / float(S[3] - S[4] - E) / 4**0.5 + sum_tol(4 + 2)
    assert relative_error(B @ A, expected) <= checked(tol)
    torch.testing.assert_close(B.T @ B, torch.eye(4) * 64**0.5 / gamma, rtol=0, atol=2 * sum_tol(64) * 64**0.5 / gamma)


@pytest.mark.parametrize("decay", [0.5, 0.8, 0.9])
@pytest.mark.parametrize("r", [4, 8, 16])
def test_randomized_svd_subspace_error_bound(decay, r):
    """Default q = r + max(r, 16) and 4 power iterations: the top-r subspace error (vs a float64 SVD) is at most
    1e-4, or at most twice that of an exact fp32 SVD where fp32 itself cannot resolve the gap
    (sigma_r / sigma_1 below ~1e-4)."""
    M = decaying_matrix(300, 200, decay)
    t = randomized_svd(M.float(), r, seed=3)
    e64, e32 = exact_svd(M, r), exact_svd(M.float(), r)
    for truth, fp32, ours in ((e64.U, e32.U, t.U), (e64.Vh.T, e32.Vh.T, t.Vh.T)):
        assert subspace_sine(truth, ours) <= max(1e-4, 2 * subspace_sine(truth, fp32))  # the design goal
    if decay ** (r - 1) > 1e-3:  # a well-resolved spectrum meets the 1e-4 goal outright
        assert subspace_sine(e64.U, t.U) <= 1e-4
    # float32 passes (a range finder, 4 power iterations of two products, the projection), each a backward
    # stable sum over a side; each singular value within |E| (Weyl)
    E = (2 * 4 + 2) * sum_tol(300 + 200) * float(M.norm())
    torch.testing.assert_close(t.S.double(), e64.S, rtol=0, atol=E)


def test_randomized_svd_is_seeded():
    M = decaying_matrix().float()
    a, b = randomized_svd(M, 8, seed=5), randomized_svd(M, 8, seed=5)
    assert torch.equal(a.U, b.U) and torch.equal(a.S, b.S) and torch.equal(a.Vh, b.Vh)


def test_subspace_sine_reference():
    """sin of the principal angle between span(e1) and span(cos t e1 + sin t e2) is sin t."""
    t = 0.3
    U1 = torch.tensor([[1.0], [0.0], [0.0]])
    U2 = torch.tensor([[torch.cos(torch.tensor(t))], [torch.sin(torch.tensor(t))], [0.0]])
    assert subspace_sine(U1, U2) == pytest.approx(torch.sin(torch.tensor(t)).item(), rel=sum_tol(3))  # float32 input


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"r": 70}, "larger than the smallest dimension"),
        ({"r": 0}, "rank must be >= 1"),
        ({"r": 4, "variant": "lora-ga"}, "not 'lora-ga'"),
        ({"r": 4, "gamma": 0.0}, "gamma must be positive"),
        ({"r": 4, "svd": "full"}, "Unknown svd"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        lora_factors(decaying_matrix(96, 64).float(), **kwargs)


def test_zero_gradient_is_refused():
    with pytest.raises(ValueError, match="gradient is zero"):
        lora_factors(torch.zeros(8, 6), 2)


def test_factors_do_not_depend_on_the_svd_sign_choice():
    """Flipping singular pairs (as a rounding change may) gives the same factors, with a positive
    largest entry in every column of -B (B = -U sqrt(S) ...)."""
    torch.manual_seed(0)
    G = torch.randn(20, 12, dtype=torch.float64)
    t = exact_svd(G, 4)
    flips = torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=torch.float64)
    flipped = TopSVD(t.U * flips, t.S, flips[:, None] * t.Vh)
    for variant in ("lora-one", "spectral", "lora-one-v1"):
        B1, A1 = lora_factors(t, 4, variant)
        B2, A2 = lora_factors(flipped, 4, variant)
        assert torch.equal(B1, B2) and torch.equal(A1, A2)  # sign flips are exact
    B, _ = lora_factors(t, 4)
    columns = -B
    assert (columns.gather(0, columns.abs().argmax(0, keepdim=True)) > 0).all()
