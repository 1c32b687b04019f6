"""`lora-one init`: the step-0 adapter alone."""

from __future__ import annotations

from lora_one.cli.args import add_settings, settings_from
from lora_one.recipes.runs import run_init
from lora_one.recipes.settings import InitSettings


def add_parser(sub) -> None:
    p = sub.add_parser("init", help="compute the LoRA-One init and save the step-0 adapter")
    add_settings(p, InitSettings)
    p.set_defaults(func=cmd)


def print_layer_table(stats: list[dict]) -> None:
    print(f"{'layer':<48} {'shape':>12} {'sigma_1':>10} {'|sBA|/|W|':>10}")
    for s in stats:
        sigma, update = (f"{s[k]:.3e}" if s[k] is not None else "-" for k in ("sigma_1", "relative_update"))
        shape = "x".join(map(str, s["shape"]))
        print(f"{s['layer']:<48} {shape:>12} {sigma:>10} {update:>10}")


def cmd(args) -> dict:
    settings = settings_from(args)
    meta = run_init(settings)
    print_layer_table(meta["layers"])
    print(f"gradient phase {meta['gradient_seconds']:.2f} s, SVD phase {meta['svd_seconds']:.2f} s")
    print(f"saved the step-0 adapter and its lora_one.json in {settings.out}")
    return meta
