"""`lora-one finetune`: LoRA-One init, then training with `transformers.Trainer`."""

from __future__ import annotations

from lora_one.cli.args import add_settings, settings_from
from lora_one.recipes.finetune import TrainingInterrupted, run_finetune
from lora_one.recipes.settings import FinetuneSettings


def add_parser(sub) -> None:
    p = sub.add_parser("finetune", help="LoRA-One init + fine-tuning (transformers.Trainer); saves a stock PEFT "
                       "adapter")
    add_settings(p, FinetuneSettings)
    p.set_defaults(func=cmd)


def cmd(args) -> dict:
    try:
        summary = run_finetune(settings_from(args))
    except (TrainingInterrupted, KeyboardInterrupt):
        raise SystemExit(130) from None
    if summary["process_index"] != 0:
        return summary
    final = summary["final_eval"]
    if final:
        shown = ", ".join(f"{k[5:]} {v:.4f}" for k, v in final.items() if k.startswith("eval_") and k != "eval_n")
        print(f"step {final['step']}: {shown}")
    print(f"saved the adapter, metrics.jsonl and loss.png in {summary['out']}")
    return summary
