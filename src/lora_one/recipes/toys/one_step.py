"""Experiment 2: the spectral init alone, no training, approximates `Delta` better with more samples.

Linear teacher with Gaussian `x`, so `E[-G] = Delta`: the `spectral` variant with `gamma = 1` (and
`s = 1`) gives `s B0 A0 = -G_r`, an unbiased one-step estimate of `Delta`. We measure
`||s B0 A0 - Delta||_op / ||Delta||_op` against the number of samples `N` behind `G` (Theorem 3.3
bounds it by `eps` once `N` is large enough; for Gaussian data it should fall like `sqrt(d / N)`).
`lora-one` with `gamma = 1` rescales the same matrix to top singular value 1 `= ||Delta||_op`.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from tqdm.auto import tqdm

from lora_one.recipes.toys.common import fit_line, generator, make_teacher, normalised, spectral_adapter
from lora_one.recipes.toys.report import Report, figure, label, save

TITLE = "Spectral init alone: one-step error against the number of samples"
FULL = dict(d=100, k=100, r=8, trials=5)
QUICK = dict(d=40, k=40, r=8, trials=3)
N_PER_D = [1, 2, 4, 16, 64]
SINGULAR_VALUES = normalised([4, 3, 2, 1])
VARIANTS = {"spectral": 1.0, "lora-one": 1.0}  # variant -> gamma (both make s B0 A0 ~ Delta here)


def run(out: Path, seed: int, quick: bool) -> Report:
    cfg = QUICK if quick else FULL
    d, k, r = cfg["d"], cfg["k"], cfg["r"]
    errors = {v: {m: [] for m in N_PER_D} for v in VARIANTS}
    for trial in tqdm(range(cfg["trials"]), desc="one-step", leave=False):
        base = make_teacher(d, k, d, SINGULAR_VALUES, generator(seed * 1000 + trial))
        for m in N_PER_D:  # one Delta per trial, fresh samples for every N
            teacher = base.resampled(m * d, generator(seed * 1000 + trial + 100_000 * m))
            norm = float(torch.linalg.matrix_norm(teacher.delta, ord=2))
            for variant, gamma in VARIANTS.items():
                adapter = spectral_adapter(teacher, r, variant, gamma)
                gap = adapter.weight - teacher.target
                errors[variant][m].append(float(torch.linalg.matrix_norm(gap, ord=2)) / norm)

    mean = {v: [sum(errors[v][m]) / len(errors[v][m]) for m in N_PER_D] for v in VARIANTS}
    report = Report(
        "one-step",
        TITLE,
        {**cfg, "n_per_d": N_PER_D, "singular_values": SINGULAR_VALUES, "gamma": VARIANTS,
         "scale_s": 1.0, "seed": seed, "quick": quick},
    )
    report.data = {
        "n": [m * d for m in N_PER_D],
        "relative_op_error_mean": mean,
        "relative_op_error_trials": {v: {str(m): errors[v][m] for m in N_PER_D} for v in VARIANTS},
        "sqrt_d_over_n": [math.sqrt(1 / m) for m in N_PER_D],
    }
    spectral = mean["spectral"]
    # slope of log error against log N: -1/2 for the sqrt(d/N) rate
    slope, _, _ = fit_line([math.log10(m) for m in N_PER_D], [math.log10(e) for e in spectral])
    report.data["loglog_slope"] = slope
    report.claim(
        "one_step_error_shrinks_with_n",
        "||s B0 A0 - Delta||_op / ||Delta||_op of the spectral init (gamma = 1, no training), averaged "
        f"over {cfg['trials']} draws, strictly decreases as N grows through {N_PER_D} x d.",
        all(a > b for a, b in zip(spectral, spectral[1:])),
        mean_relative_error=dict(zip(map(str, [m * d for m in N_PER_D]), spectral)),
        loglog_slope=slope,
        lora_one_gamma1_mean_relative_error=dict(zip(map(str, [m * d for m in N_PER_D]), mean["lora-one"])),
    )

    fig, (ax,) = figure(1, width=6.5)
    ns = report.data["n"]
    for variant, gamma in VARIANTS.items():
        ax.plot(ns, mean[variant], marker="o", label=f"{variant} (gamma {gamma:g}), mean of {cfg['trials']}")
    for m in N_PER_D:
        ax.scatter([m * d] * cfg["trials"], errors["spectral"][m], color="C0", alpha=0.3, s=12)
    ax.plot(ns, [spectral[0] * math.sqrt(ns[0] / n) for n in ns], "k--", label="slope -1/2 (sqrt(d/N))")
    ylabel = "||s B0 A0 - Delta||_op / ||Delta||_op"
    label(ax, "Relative error of s B0 A0 at step 0", "number of samples N", ylabel, logy=True, logx=True)
    save(fig, report, out, "one_step.png", f"{TITLE} (d={d}, r={r}, rank Delta = 4)")
    return report

