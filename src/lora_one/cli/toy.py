"""`lora-one toy EXPERIMENT [--out DIR] [--seed S] [--quick]`: the paper's theory experiments.

Each experiment writes PNG figures and a `results.json` (plotted numbers, and every claim it checks as
a boolean with the numbers behind it); `lora-one toy all` runs them all and writes a `summary.md`.
The exit status is 0 if every claim holds, else 1 (the files are written either way).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lora_one.recipes.toys import DEFAULT_ROOT, EXPERIMENTS, run_all, run_experiment


def add_parser(sub) -> None:
    p = sub.add_parser("toy", help="run the paper's theory experiments (linear / ReLU teachers) and check its claims",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiment", choices=[*EXPERIMENTS, "all"], help="which experiment, or all")
    p.add_argument("--out", default=None, help="output folder (default runs/toy/EXPERIMENT; runs/toy for all)")
    p.add_argument("--seed", type=int, default=0, help="seed of data and inits (default 0)")
    p.add_argument("--quick", action="store_true", help="small sizes, seconds per experiment (tests)")
    p.set_defaults(func=cmd)


def _print(report, out: Path) -> None:
    status = "all claims hold" if all(c.holds for c in report.claims) else "SOME CLAIMS FAIL"
    print(f"[{report.experiment}] {report.seconds:.1f} s, {status} -> {out}")
    for c in report.claims:
        print(f"  {'PASS' if c.holds else 'FAIL'}  {c.name}")


def cmd(args) -> int:
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
