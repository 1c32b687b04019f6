"""The paper's theory experiments (`lora-one toy EXPERIMENT [--out DIR] [--seed S] [--quick]`).

Each experiment writes PNG figures and a `results.json` (plotted numbers, and every claim it checks as
a boolean with the numbers behind it); `lora-one toy all` runs them all and writes a `summary.md`.
"""

from __future__ import annotations

import importlib
import time
from pathlib import Path

from lora_one.core.errors import UsageError

# name on the command line -> module in this package (each has TITLE and run(out, seed, quick) -> Report)
EXPERIMENTS = {
    "alignment": "alignment",
    "one-step": "one_step",
    "spectral": "spectral_inits",
    "conditioning": "conditioning",
    "nonlinear": "nonlinear",
    "phase": "phase",
}
DEFAULT_ROOT = Path("runs") / "toy"


def run_experiment(name: str, out: Path | None = None, seed: int = 0, quick: bool = False):
    """Run one experiment, write its figures and `results.json` into `out`; return its Report."""
    if name not in EXPERIMENTS:
        raise UsageError(f"Unknown toy experiment {name!r}; choose one of {', '.join(EXPERIMENTS)} or all.")
    import torch

    module = importlib.import_module(f"lora_one.recipes.toys.{EXPERIMENTS[name]}")
    out = Path(out) if out is not None else DEFAULT_ROOT / name
    threads = torch.get_num_threads()
    # The toys multiply matrices of size ~100: one thread is fastest, and on a shared CPU extra
    # threads spin against other jobs (measured: the same run took 1 s on one thread, up to 60 s on two).
    torch.set_num_threads(1)
    try:
        start = time.perf_counter()
        report = module.run(out, seed, quick)
        report.seconds = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)
    report.write(out)
    return report


def run_all(out: Path | None = None, seed: int = 0, quick: bool = False):
    """Every experiment into `out/<name>/`, then `out/summary.md`; returns the Reports."""
    from lora_one.recipes.toys.summary import write_summary

    root = Path(out) if out is not None else DEFAULT_ROOT
    reports = [run_experiment(name, root / name, seed, quick) for name in EXPERIMENTS]
    write_summary(root, reports)
    return reports


__all__ = ["EXPERIMENTS", "DEFAULT_ROOT", "run_experiment", "run_all"]
