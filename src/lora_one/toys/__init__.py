"""The paper's theory experiments as `lora-one toy EXPERIMENT [--out DIR] [--seed S] [--quick]`.

Each experiment writes PNG figures and a `results.json` (plotted numbers, and every claim it checks as
a boolean with the numbers behind it); `lora-one toy all` runs them all and writes a `summary.md`.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

from lora_one.errors import UsageError

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

    module = importlib.import_module(f"lora_one.toys.{EXPERIMENTS[name]}")
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
    from lora_one.toys.summary import write_summary

    root = Path(out) if out is not None else DEFAULT_ROOT
    reports = [run_experiment(name, root / name, seed, quick) for name in EXPERIMENTS]
    write_summary(root, reports)
    return reports


def _print(report, out: Path) -> None:
    status = "all claims hold" if all(c.holds for c in report.claims) else "SOME CLAIMS FAIL"
    print(f"[{report.experiment}] {report.seconds:.1f} s, {status} -> {out}")
    for c in report.claims:
        print(f"  {'PASS' if c.holds else 'FAIL'}  {c.name}")


def main_toy(args: argparse.Namespace) -> int:
    """The `toy` subcommand: exit status 0 if every claim holds, else 1 (the files are written either way)."""
    out = Path(args.out) if args.out else None
    if args.experiment == "all":
        reports = run_all(out, args.seed, args.quick)
        root = out or DEFAULT_ROOT
        for report in reports:
            _print(report, root / report.experiment)
        print(f"summary: {root / 'summary.md'}")
    else:
        reports = [run_experiment(args.experiment, out, args.seed, args.quick)]
        _print(reports[0], out or DEFAULT_ROOT / args.experiment)
    return 0 if all(c.holds for r in reports for c in r.claims) else 1


def add_toy_parser(subparsers) -> argparse.ArgumentParser:
    """Register `toy` on an argparse subparsers object; sets `func=main_toy`."""
    parser = subparsers.add_parser(
        "toy",
        help="run the paper's theory experiments (linear / ReLU teachers) and check its claims",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("experiment", choices=[*EXPERIMENTS, "all"], help="which experiment, or all")
    parser.add_argument(
        "--out", default=None, help="output folder (default runs/toy/EXPERIMENT; runs/toy for all)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of data and inits (default 0)")
    parser.add_argument("--quick", action="store_true", help="small sizes, seconds per experiment (tests)")
    parser.set_defaults(func=main_toy)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lora_one.toys")
    add_toy_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["toy", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


__all__ = ["EXPERIMENTS", "add_toy_parser", "run_experiment", "run_all", "main_toy"]
