"""`lora-one merge`: fold an adapter into its base model; a plain Hugging Face model folder out."""

from __future__ import annotations

from lora_one.recipes.merge import merge_adapter
from lora_one.recipes.constants import TASKS
from lora_one.recipes.runs import check_out_dir


def add_parser(sub) -> None:
    p = sub.add_parser("merge", help="merge an adapter into its base model and save a plain HF model folder")
    p.add_argument("--model", required=True, help="the base model the adapter was trained on (alias or folder)")
    p.add_argument("--adapter", required=True, help="adapter folder")
    p.add_argument("--out", required=True, help="folder for the merged model")
    p.add_argument("--task", choices=TASKS, help="default: from the adapter")
    p.add_argument("--overwrite", action="store_true", help="replace our files in an existing --out")
    p.set_defaults(func=cmd)


def cmd(args) -> None:
    check_out_dir(args.out, args.overwrite)
    merge_adapter(args.model, args.adapter, args.out, args.task)
    print(f"wrote the merged model to {args.out}")
