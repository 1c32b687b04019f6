"""`lora-one merge`: fold an adapter into its base model and save a plain Hugging Face model folder."""

from __future__ import annotations

from pathlib import Path

import torch

from lora_one.files import MODEL, staged_folder


def merge_adapter(model: str, adapter_dir: str | Path, out_dir: str | Path, task: str | None = None) -> Path:
    """Save `base + adapter` as an ordinary model folder (weights merged, no PEFT needed to load it).

    Published by `lora_one.files`' rules: into an existing folder only our files move, an older
    save's weight shards go, and `config.json` comes last.
    """
    from lora_one.load import load_for_eval  # noqa: PLC0415

    peft_model, tokenizer, task, _ = load_for_eval(model, adapter_dir, task, device=torch.device("cpu"))
    merged = peft_model.merge_and_unload()
    with staged_folder(out_dir, MODEL) as tmp:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return Path(out_dir)


def add_merge_parser(sub) -> None:
    from lora_one.models import TASKS  # noqa: PLC0415

    p = sub.add_parser("merge", help="merge an adapter into its base model and save a plain HF model folder")
    p.add_argument("--model", required=True, help="the base model the adapter was trained on (alias or folder)")
    p.add_argument("--adapter", required=True, help="adapter folder")
    p.add_argument("--out", required=True, help="folder for the merged model")
    p.add_argument("--task", choices=TASKS, help="default: from the adapter")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_merge)


def cmd_merge(args) -> None:
    from lora_one.cli import check_out_dir  # noqa: PLC0415

    out = Path(args.out)
    check_out_dir(out, args.overwrite)
    merge_adapter(args.model, args.adapter, out, args.task)
    print(f"wrote the merged model to {out}")
