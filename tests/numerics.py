"""The tests' round-off bounds, derived from the arithmetic instead of read off one machine's output.

Float32 work is checked against a float64 reference. A sum of n float32 terms errs by at most
`lambda * sqrt(n) * u` relative to the sum of their magnitudes, except with probability
`2 exp(-lambda^2 / 2)` (u = eps / 2, the unit round-off; Higham and Mary, "A new approach to
probabilistic rounding error analysis", SIAM J. Sci. Comput. 2019, Thm 3.1). The worst case `n * u`
is never met by round-off that varies in sign, and would hide real bugs at the sizes of real models.
A result that is the end of a chain of such sums (a network's forward pass, its backward pass, the
sum over tokens of a weight gradient) gathers the errors of every link, so n counts the terms of
the whole chain. Kernels differ between CPUs (AVX2, AVX-512, MKL or not) only in the order and the
fusion of these same operations, which this bound covers. Each bound is asserted to stay far below
what a real bug gives (a wrong scale, a missing term, a 1% error), so no test is made blind by it.
"""

from __future__ import annotations

import math

import torch

U32 = torch.finfo(torch.float32).eps / 2
U64 = torch.finfo(torch.float64).eps / 2
LAMBDA = 8.0  # 2 exp(-32) ~ 2.5e-14 per sum: never met in the sums of a test suite
BUG = 1e-2  # the smallest error of a real bug that every bound must leave visible


def sum_tol(n: int, u: float = U32) -> float:
    """Relative error bound of a float32 (or, with `u=U64`, float64) chain of sums of `n` terms."""
    return LAMBDA * math.sqrt(n) * u


def network_chain(model: torch.nn.Module, tokens: int, positions: int) -> int:
    """The terms on the longest chain of sums that gives one weight gradient of a transformer: the
    forward pass (each layer's projections, attention over the positions, the MLP, the output over
    the vocabulary), the backward pass over the same sums, and the sum over all `tokens` that forms
    `G = sum_t g_t^T x_t`."""
    c = getattr(model, "config", model)
    width = getattr(c, "hidden_size", None) or c.d_model
    inner = getattr(c, "intermediate_size", None) or getattr(c, "d_ff", None) or 4 * width
    layers = (getattr(c, "num_hidden_layers", None) or c.num_layers) + (getattr(c, "num_decoder_layers", 0) or 0)
    per_layer = 4 * width + positions + inner  # q, k, v, o; attention; up (and gate) and down
    return 2 * (layers * per_layer + c.vocab_size) + tokens


def gradient_tol(model: torch.nn.Module, examples) -> float:
    """Relative Frobenius error allowed to a float32 weight gradient over `examples` (ragged examples
    or padded batches) against its float64 reference."""
    lengths = []
    for e in examples:
        ids = e["input_ids"]
        mask = e.get("attention_mask")
        rows = ids[None] if ids.ndim == 1 else ids
        lengths += (mask.sum(1) if mask is not None else torch.full((len(rows),), rows.shape[1])).tolist()
    # an encoder-decoder also runs its decoder over the labels
    decoder = getattr(getattr(model, "config", model), "is_encoder_decoder", False)
    positions = max(lengths) + (max(e["labels"].shape[-1] for e in examples) if decoder else 0)
    return checked(sum_tol(network_chain(model, sum(lengths), positions)))


def output_tol(model: torch.nn.Module, positions: int, tokens: int = 0) -> float:
    """Relative error bound of a float32 output of `model` (a logit, a log-probability; with `tokens`,
    a loss summed or averaged over that many) against exact arithmetic, relative to the magnitudes on
    its chain of sums (for logits and log-probabilities, their largest magnitude)."""
    return checked(sum_tol(network_chain(model, tokens, positions)))


def assert_same_outputs(got: torch.Tensor, want: torch.Tensor, model: torch.nn.Module, positions: int) -> None:
    """Two float32 computations of the same outputs (logits, scores) by different arithmetic (batched or
    not, padded or not, merged weights or an adapter): each within `output_tol` of the exact value."""
    atol = 2 * output_tol(model, positions) * float(want.abs().max())
    torch.testing.assert_close(got, want, rtol=0, atol=atol)


def checked(tol: float) -> float:
    """`tol`, asserted to leave a real bug (a 1% error) visible."""
    assert tol < BUG, f"a bound of {tol:.2g} would hide a real bug: make the test's problem better conditioned"
    return tol


def truncation_tols(G: torch.Tensor, r: int, rel: float) -> tuple[float, float]:
    """Relative Frobenius error bounds of `G_r / sigma_1` (the top-r truncation of G scaled by its top
    singular value: what every LoRA-One step-0 product is), and of its norm alone, computed from
    `G + E` with `|E|_F <= rel |G|_F`. The subspaces move by at most `sqrt(2) |E|_F / gap` each (Wedin's
    theorem, gap = sigma_r - sigma_{r+1} - |E|), so `|dG_r| <= |E| (1 + 2 sqrt(2) sigma_1 / gap)`;
    the norm `|G_r|` and sigma_1 move by at most |E| whatever the gap (Weyl). The float32 factors' own
    rounding and their product's sum of r terms come on top. The first bound is infinite where |E|
    leaves the top-r subspace undetermined."""
    S = torch.linalg.svdvals(G.double())
    E = rel * float(S.square().sum().sqrt())
    gap = float(S[r - 1] - (S[r] if r < len(S) else 0.0)) - E
    Gr, s1 = float(S[:r].square().sum().sqrt()), float(S[0])
    own = sum_tol(r + 2)
    norm = 2 * E / Gr + E / s1 + own
    return (E * (1 + 2 * math.sqrt(2) * s1 / gap) / Gr + E / s1 + own if gap > 0 else math.inf), norm


def truncation_tol(G: torch.Tensor, r: int, rel: float) -> float:
    """The first bound of `truncation_tols`."""
    return truncation_tols(G, r, rel)[0]


def assert_same_top_svd(svd, G: torch.Tensor, r: int, rel: float) -> None:
    """`svd` (a `TopSVD`) is the top-r SVD of `G + E`, `|E|_F <= rel |G|_F`, checked without assuming a
    gap: its rank-r product is no farther from G than G's own truncation plus 2|E| (it is the best
    rank-r approximation of G + E, which G_r is no closer to than |E|), and each singular value is within
    |E| (Weyl). Where the gap resolves the subspaces (Wedin: sine <= sqrt(2) |E| / gap below 1%), they
    are checked too."""
    G = G.double()
    S = torch.linalg.svdvals(G)
    E = rel * float(G.norm())
    approx = svd.U.double() @ torch.diag(svd.S.double()) @ svd.Vh.double()
    best = float(S[r:].square().sum().sqrt())
    assert float((G - approx).norm()) <= best + 2 * E, (float((G - approx).norm()), best, E)
    torch.testing.assert_close(svd.S.double(), S[:r], rtol=0, atol=E)
    gap = float(S[r - 1] - (S[r] if r < len(S) else 0.0)) - E
    if gap > 0 and math.sqrt(2) * E / gap < BUG:
        U, _, Vh = torch.linalg.svd(G, full_matrices=False)
        for exact, got in ((U[:, :r], svd.U), (Vh[:r].mT, svd.Vh.mT)):
            sine = float(torch.linalg.matrix_norm(got.double() - exact @ (exact.mT @ got.double()), ord=2))
            assert sine <= math.sqrt(2) * E / gap + sum_tol(G.shape[0] + G.shape[1]), (sine, E, gap)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).norm() / want.double().norm())


def products(state) -> dict[str, torch.Tensor]:
    """`{layer: B @ A}` of every LoRA layer of a model or state dict (names as in the base model): what
    the init fixes, unlike the joint sign of each singular pair of the factors."""
    state = state if isinstance(state, dict) else dict(state.named_parameters())
    return {
        n.split(".lora_A.")[0].removeprefix("base_model.model."):
        state[n.replace(".lora_A.", ".lora_B.")].detach().double() @ a.detach().double()
        for n, a in state.items()
        if ".lora_A." in n
    }


def expected_products(gradients, layers, r: int, gamma: float) -> dict[str, torch.Tensor]:
    """Step-0 `B @ A` of lora-one, `-G_r / (gamma sigma_1)`, from a dense float64 SVD of each layer's
    reference gradient."""
    out = {}
    for name in layers:
        U, S, Vh = torch.linalg.svd(-gradients[name].double(), full_matrices=False)
        out[name] = (U[:, :r] * S[:r]) @ Vh[:r] / (gamma * S[0])
    return out


def assert_close_products(got, gradients, r: int, gamma: float, rel: float, want=None) -> None:
    """Each layer's `B @ A` equals `-G_r / (gamma sigma_1)` of its float64 reference gradient `G`, up to
    the truncation bound of a float32 gradient known to relative error `rel`; with `want` (the products
    of another float32 computation of the same step), equals those within twice that bound.

    Where the bound would hide a 1% error (a top-r subspace float32 cannot resolve: sigma_r close to
    sigma_{r+1}), what the gap does not affect is checked instead: the norm, `|G_r| / (gamma sigma_1)`
    within the Weyl bound, and the alignment with `-G`: the best rank-r step `X` of `G + E` has
    `<X, -G> >= |X| (|G_r| - 2|E|)` (it is optimal for `G + E`, and `|X| >= |G_r| - |E|`), while no rank-r
    `X` exceeds `|X| |G_r|` (von Neumann). At least one layer of every test gets the full check."""
    formula = expected_products(gradients, got, r, gamma)
    assert got.keys() == formula.keys() and got
    full = 0
    for name, exact in formula.items():
        tol, norm_tol = truncation_tols(gradients[name], r, rel)
        G = gradients[name].double()
        reference, bound = (exact, tol) if want is None else (want[name], 2 * tol)
        if bound < BUG:
            full += 1
            err = relative_error(got[name], reference)
            assert err <= bound, (name, err, bound)
            continue
        X = got[name].double()
        norm_err = abs(float(X.norm() / exact.norm()) - 1)
        assert norm_err <= checked(norm_tol), (name, "norm", norm_err, norm_tol)
        E = rel * float(G.norm())
        Gr = float(exact.norm()) * gamma * float(torch.linalg.matrix_norm(G, ord=2))
        misalignment = 1 - float((X * -G).sum() / (X.norm() * Gr))
        assert misalignment <= checked(2 * E / Gr + sum_tol(r + 2)), (name, "alignment", misalignment)
    assert full, f"no layer resolves its top-{r} subspace at this precision: choose a better conditioned problem"
