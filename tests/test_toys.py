"""The theory toys (`lora-one toy ...`) in --quick mode: every claim they check must hold."""

from __future__ import annotations

import json

import pytest
import torch
from numerics import U64, sum_tol

from lora_one.cli import build_parser, main
from lora_one.recipes.toys import EXPERIMENTS, run_all
from lora_one.recipes.toys.spectral_inits import paper_lora_ga

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory):
    """`lora-one toy all --quick` once for the whole module (a few seconds)."""
    root = tmp_path_factory.mktemp("toy")
    run_all(root, seed=0, quick=True)
    return root


@pytest.mark.parametrize("name", list(EXPERIMENTS))
def test_experiment_claims_hold(toy_root, name):
    results = json.loads((toy_root / name / "results.json").read_text())
    assert results["experiment"] == name
    assert results["claims"], f"{name} checks no claim"
    failing = {c["name"]: c["evidence"] for c in results["claims"] if c["holds"] is not True}
    assert not failing, f"claims of {name} that do not hold: {json.dumps(failing, indent=1)[:3000]}"


def test_paper_lora_ga_formula():
    """The paper's LoRA-GA: orthonormal directions r+1..2r (B) and 1..r (A) of G, scaled, base W0 - B A."""
    gen = torch.Generator().manual_seed(0)
    out, inp, r, gamma = 12, 10, 3, 16.0
    G = torch.randn(out, inp, generator=gen, dtype=torch.float64)
    W0 = torch.randn(out, inp, generator=gen, dtype=torch.float64)
    a = paper_lora_ga(G, W0, r, gamma)
    c2 = out**0.5 / gamma  # (out^(1/4) / sqrt(gamma))^2
    eye = torch.eye(r, dtype=torch.float64)
    # float64: the SVD's singular vectors are products of ~out Householder reflections of out terms each (a
    # chain of out^2 terms), a product of them sums out more, and the scale rounds a few times (4 u)
    tol = sum_tol(out * out + out, U64) + 4 * U64
    torch.testing.assert_close(a.B.mT @ a.B, c2 * eye, rtol=0, atol=c2 * tol)
    torch.testing.assert_close(a.A @ a.A.mT, c2 * eye, rtol=0, atol=c2 * tol)
    U, S, Vh = torch.linalg.svd(G)
    # B spans the left singular directions r+1..2r (orthogonal to the top r); A spans the top-r right ones
    torch.testing.assert_close(U[:, : 2 * r].mT @ a.B @ (U[:, r : 2 * r].mT @ a.B).inverse(),
                               torch.cat([torch.zeros(r, r, dtype=torch.float64), eye]), rtol=0, atol=2 * tol)
    torch.testing.assert_close((a.A @ Vh[:r].mT).abs(), c2**0.5 * eye, rtol=0, atol=c2**0.5 * tol)
    # the function is unchanged at step 0: (W0 - BA) + BA, two float64 roundings of |W0| + |BA| (and their product)
    assert ((a.weight - W0).abs() <= 3 * U64 * (W0.abs() + (a.B @ a.A).abs())).all()
    assert a.scale == 1.0


@pytest.mark.parametrize("name", list(EXPERIMENTS))
def test_experiment_writes_pngs(toy_root, name):
    results = json.loads((toy_root / name / "results.json").read_text())
    assert results["figures"]
    for figure in results["figures"]:
        data = (toy_root / name / figure).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000, figure


def test_summary_lists_every_claim_and_figure(toy_root):
    summary = (toy_root / "summary.md").read_text()
    for name in EXPERIMENTS:
        results = json.loads((toy_root / name / "results.json").read_text())
        for claim in results["claims"]:
            assert f"`{claim['name']}`" in summary
        for figure in results["figures"]:
            assert f"({name}/{figure})" in summary


def test_results_are_deterministic(toy_root, tmp_path):
    from lora_one.recipes.toys import run_experiment

    again = run_experiment("one-step", tmp_path, seed=0, quick=True).to_json()
    first = json.loads((toy_root / "one-step" / "results.json").read_text())
    assert again["data"] == first["data"]


def test_parser_registers_toy(tmp_path):
    args = build_parser().parse_args(["toy", "nonlinear", "--quick", "--seed", "3", "--out", str(tmp_path)])
    assert (args.experiment, args.quick, args.seed, args.out) == ("nonlinear", True, 3, str(tmp_path))
    with pytest.raises(SystemExit):
        build_parser().parse_args(["toy", "no-such-experiment"])


def test_toy_command_runs_one_experiment(tmp_path, capsys):
    threads = torch.get_num_threads()
    assert main(["toy", "nonlinear", "--quick", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "results.json").exists() and "[nonlinear]" in capsys.readouterr().out
    assert torch.get_num_threads() == threads  # the toys run on one thread, then restore it


def test_phase_distance_is_exact_on_the_curve():
    from lora_one.recipes.toys.phase import distance_to_minimisers

    c = torch.tensor([0.5, 1.5, -0.7, 3.0], dtype=torch.float64)
    on_curve = torch.stack([2 / c, 1 / c, c], dim=1)
    # float64: c is a simple root of the quartic p(x) = x^4 - c x^3 + 5 / c x - 5; the 4 x 4 eigensolve (a chain
    # of 16 terms) perturbs p's coefficients relatively, moving the root by that times sum |p_i c^i| / |p'(c)|
    # = (2 c^4 + 10) / |c^3 + 5 / c|, and the curve's point (2 / c, 1 / c, c) by |curve'(c)| = sqrt(5 / c^4 + 1)
    # times that; the distance's sum of 3 squares rounds on top
    moved = (2 * c**4 + 10) / (c**3 + 5 / c).abs() * (5 / c**4 + 1).sqrt()
    bound = moved * sum_tol(16, U64) + sum_tol(3, U64) * on_curve.abs().amax(1)
    assert (distance_to_minimisers(on_curve) <= bound).all()
    # the origin: min over c of 5 / c^2 + c^2 is 2 sqrt(5), at c^2 = sqrt(5). The distance is stationary in c
    # there, so the root's error enters squared: float64 round-off of a few operations (sqrt, divisions, squares)
    origin = torch.zeros(1, 3, dtype=torch.float64)
    assert distance_to_minimisers(origin).item() == pytest.approx((2 * 5**0.5) ** 0.5, rel=sum_tol(8, U64))
