"""Experiment 6: the two-parameter picture `pred = b (x^T a)`, 4 samples in 2-D, target `beta = (2, 1)`.

A rank-1 LoRA on a zero `1 x 2` weight: `lora_B = [[b]]`, `lora_A = a^T`. The global minimisers are
the curve `b a = beta`, i.e. `(a1, a2, b) = (2/c, 1/c, c)`. GD from the usual random init (`a`
Gaussian, `b = 0`) and from the spectral init (`lora_factors(G, 1, "spectral", gamma=1)`, so
`b a = -G = Sigma_hat beta`), for three seeds: which start is closer to the curve, and how many GD
steps each needs to get within `TOL` of it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lora_one.recipes.toys.common import (
    DTYPE,
    Teacher,
    first_step_below,
    gaussian,
    generator,
    random_adapter,
    spectral_adapter,
    train,
)
from lora_one.recipes.toys.report import Report, label, plt, positive, save

TITLE = "Two-parameter model b (x^T a): GD paths to the curve of global minimisers"
FULL = dict(n=4, steps=50_000, lr=0.05, random_alpha2=1e-2, seeds=3)
QUICK = dict(n=4, steps=50_000, lr=0.05, random_alpha2=1e-2, seeds=3)
BETA = (2.0, 1.0)
TOL = 1e-4  # "reached the minimiser set": Euclidean distance to the curve in (a1, a2, b)


def distance_to_minimisers(points: torch.Tensor) -> torch.Tensor:
    """Distance from each `(a1, a2, b)` row to the curve `(beta1/c, beta2/c, c)`, `c != 0`.

    Setting the derivative in `c` of the squared distance to zero gives the quartic
    `c^4 - b c^3 + (beta1 a1 + beta2 a2) c - |beta|^2 = 0`; the nearest point is at one of its real roots.
    """
    b1, b2 = BETA
    a1, a2, b = points.unbind(-1)
    n = points.shape[0]
    companion = torch.zeros(n, 4, 4, dtype=DTYPE)  # of c^4 + p3 c^3 + p2 c^2 + p1 c + p0
    companion[:, 1:, :3] = torch.eye(3, dtype=DTYPE)
    companion[:, 0, 0] = b  # -p3
    companion[:, 0, 2] = -(b1 * a1 + b2 * a2)  # -p1
    companion[:, 0, 3] = b1**2 + b2**2  # -p0
    roots = torch.linalg.eigvals(companion)
    c = roots.real
    usable = (roots.imag.abs() <= 1e-9 * (1 + roots.abs())) & (c.abs() > 1e-12)
    c = torch.where(usable, c, torch.ones_like(c))
    sq = (a1[:, None] - b1 / c) ** 2 + (a2[:, None] - b2 / c) ** 2 + (b[:, None] - c) ** 2
    sq = torch.where(usable, sq, torch.full_like(sq, float("inf")))
    return sq.min(dim=1).values.sqrt()


def _path(teacher: Teacher, start, steps: int, lr: float) -> torch.Tensor:
    """GD from `start` until `||b a - beta|| <= TOL / 100` (then well inside TOL of the curve) or `steps`."""
    points = []

    def observe(t, adapter, trace) -> None:
        points.append(torch.cat([adapter.A[0], adapter.B[0]]))

    train(teacher, start, steps, lr, observe=observe, stop_below=0.5 * (TOL / 100) ** 2)
    return torch.stack(points)


def run(out: Path, seed: int, quick: bool) -> Report:
    cfg = QUICK if quick else FULL
    beta = torch.tensor([BETA], dtype=DTYPE)
    paths, dist = {}, {}
    for i in range(cfg["seeds"]):
        gen = generator(seed * 1000 + i)
        X = gaussian((cfg["n"], 2), gen)
        teacher = Teacher(X=X, W0=torch.zeros(1, 2, dtype=DTYPE), delta=beta)
        starts = {
            "spectral": spectral_adapter(teacher, 1, "spectral", 1.0),
            "random": random_adapter(teacher, 1, cfg["random_alpha2"], gen),
        }
        for name, start in starts.items():
            path = _path(teacher, start, cfg["steps"], cfg["lr"])
            paths[(name, i)] = path
            dist[(name, i)] = distance_to_minimisers(path).tolist()

    seeds = list(range(cfg["seeds"]))
    start_dist = {n: [dist[(n, i)][0] for i in seeds] for n in ("spectral", "random")}
    reach = {n: [first_step_below(dist[(n, i)], TOL) for i in seeds] for n in ("spectral", "random")}
    report = Report(
        "phase",
        TITLE,
        {**cfg, "beta": list(BETA), "tolerance": TOL, "data_seeds": [seed * 1000 + i for i in seeds],
         "random_init": "a ~ N(0, alpha^2 / 2) per entry, b = 0", "spectral_init": "spectral, gamma = 1",
         "seed": seed, "quick": quick},
    )
    report.data = {
        "paths": {f"{n}/seed{i}": paths[(n, i)].tolist() for n, i in paths},
        "distance_to_minimisers": {f"{n}/seed{i}": v for (n, i), v in dist.items()},
        "start_distance": start_dist,
        "steps_to_tolerance": reach,
    }
    report.claim(
        "spectral_starts_closer",
        "For each of the three seeds, the spectral start is closer to the curve of global minimisers "
        "than the random start.",
        all(s < r for s, r in zip(start_dist["spectral"], start_dist["random"])),
        start_distance=start_dist,
    )
    report.claim(
        "spectral_needs_fewer_steps",
        f"For each seed, GD from the spectral start gets within {TOL:g} of the curve in fewer steps "
        "than from the random start.",
        all(s is not None and (r is None or s < r) for s, r in zip(reach["spectral"], reach["random"])),
        steps=reach,
        budget=cfg["steps"],
    )

    fig = plt.figure(figsize=(13, 5.5))
    ax3 = fig.add_subplot(1, 2, 1, projection="3d")
    every = torch.cat(list(paths.values()))
    lo, hi = every.min(dim=0).values - 0.5, every.max(dim=0).values + 0.5
    for sign in (1, -1):  # both branches of the curve, cut to the box around the paths
        c = sign * torch.logspace(-1.5, 1.5, 2000, dtype=DTYPE)
        curve = torch.stack([BETA[0] / c, BETA[1] / c, c], dim=1)
        curve[((curve < lo) | (curve > hi)).any(dim=1)] = float("nan")
        ax3.plot(*curve.T.tolist(), color="black", lw=2,
                 label="global minimisers (2/b, 1/b, b)" if sign == 1 else None)
    for (name, i), path in paths.items():
        style = "-" if name == "spectral" else "--"
        ax3.plot(*path.T.tolist(), style, color=f"C{i}", label=f"{name}, seed {i}")
        ax3.scatter(*path[0].tolist(), color=f"C{i}", marker="o" if name == "spectral" else "^")
    ax3.set_xlim(float(lo[0]), float(hi[0]))
    ax3.set_ylim(float(lo[1]), float(hi[1]))
    ax3.set_zlim(float(lo[2]), float(hi[2]))
    ax3.set_title("GD trajectories (o spectral start, ^ random start)")
    ax3.set_xlabel("a1")
    ax3.set_ylabel("a2")
    ax3.set_zlabel("b")
    ax3.legend(fontsize="x-small", loc="upper left")
    ax2 = fig.add_subplot(1, 2, 2)
    for (name, i), values in dist.items():
        style = "-" if name == "spectral" else "--"
        ax2.plot(positive(values), style, color=f"C{i}", label=f"{name}, seed {i}")
    ax2.axhline(TOL, color="gray", ls=":", label=f"tolerance {TOL:g}")
    xlabel = f"GD step t (step {cfg['lr']:g})"
    label(ax2, "Distance to the set of global minimisers", xlabel, "distance", logy=True)
    save(fig, report, out, "phase.png", f"{TITLE}; {cfg['n']} samples, beta = {BETA}")
    return report
