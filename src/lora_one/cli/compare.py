"""`lora-one compare`: fine-tuning methods against each other, each at its best validation setting,
over seeds, reported on the test split (docs/compare.md)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from collections.abc import Iterator
from contextlib import contextmanager

import yaml

from lora_one.cli.args import add_old_flag, add_settings, convert, settings_from
from lora_one.core.errors import UsageError
from lora_one.recipes.compare import CHOSEN, DEFAULT_METHODS, METHODS, CompareSettings, run_compare
from lora_one.recipes.finetune import TrainingInterrupted
from lora_one.recipes.settings import FinetuneSettings


def add_parser(sub) -> None:
    p = sub.add_parser("compare", help="methods against each other: each at its best learning rate on the validation "
                       "split, over seeds, reported on the test split; report.md, comparison.png, summary.json")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help=f"comma-separated methods: {', '.join(METHODS)}; change a setting of one with "
                   "name:key=value (more with :key=value), give it a grid with key=a/b/c (lr=... replaces "
                   f"--lr-grid) (default: {','.join(DEFAULT_METHODS)})")
    add_settings(p, CompareSettings)
    add_old_flag(p, "--steps", "--max-steps")
    for action in p._actions:  # set by compare for each run: refused, so not offered
        if action.dest in CHOSEN:
            action.help = argparse.SUPPRESS
    p.set_defaults(func=cmd)


def parse_methods(text: str) -> dict[str, dict]:
    """`--methods` as `label -> {"method": name, setting: value or [candidates]}`, each value read as
    its finetune setting's type (an unknown setting is left to `plan_methods` to refuse)."""
    hints = typing.get_type_hints(FinetuneSettings)
    fields = {f.name: f for f in dataclasses.fields(FinetuneSettings)}
    methods = {}
    for item in (i.strip() for i in text.split(",")):
        if not item:
            continue
        name, *pairs = item.split(":")
        spec = {"method": name.strip()}
        for pair in pairs:
            key, _, value = (part.strip() for part in pair.partition("="))
            if not key or not value:
                raise UsageError(f"--methods {item!r}: write a setting as key=value, e.g. lora-one:gamma=64.")
            key = key.replace("-", "_")
            values = [v.strip() for v in value.split("/")]
            if key in fields:
                values = [convert(fields[key], hints[key], key, yaml.safe_load(v), f"--methods {item!r}")
                          for v in values]
            spec[key] = values if len(values) > 1 else values[0]
        if item in methods:
            raise UsageError(f"--methods names {item!r} twice.")
        methods[item] = spec
    return methods


@contextmanager
def interruptible() -> Iterator[None]:
    """Ctrl-C (or a finetune run's own stop) ends the comparison with exit status 130 and a hint."""
    try:
        yield
    except (TrainingInterrupted, KeyboardInterrupt):
        print("Interrupted. Run the same command again to continue: finished runs are kept, the unfinished one "
              "starts again.", file=sys.stderr, flush=True)
        raise SystemExit(130) from None


def cmd(args) -> dict:
    with interruptible():
        return run_compare(settings_from(args), parse_methods(args.methods))
