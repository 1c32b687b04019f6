"""`lora-one eval`: held-out loss and accuracy (or exact match) of a base model, with an adapter or not."""

from __future__ import annotations

from lora_one.cli.args import add_settings, settings_from
from lora_one.recipes.runs import run_eval
from lora_one.recipes.settings import EvalSettings


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="held-out loss and accuracy (or exact match) of a base model + adapter")
    add_settings(p, EvalSettings)
    p.set_defaults(func=cmd)


def cmd(args) -> dict:
    results = run_eval(settings_from(args))
    written = results.pop("written_to", None)
    width = max(len(k) for k in results)
    for k, v in results.items():
        print(f"{k:<{width}}  {v:.4f}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    if written:
        print(f"wrote {written}")
    return results
