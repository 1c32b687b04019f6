"""`lora-one` command line: one module per subcommand, each a thin layer over a recipe.

Every user error is a `lora_one.core.errors.UsageError`: `main` prints it as one line and exits 2
(`LORA_ONE_DEBUG=1` shows the traceback). Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys

try:
    from lora_one.cli import compare, demo, eval, finetune, init, merge, toy
except ModuleNotFoundError as e:  # the library alone was installed: its core needs none of the recipes' packages
    if e.name not in ("accelerate", "datasets", "gguf", "matplotlib", "yaml"):
        raise
    sys.exit(f"lora-one: error: the command line needs the package {e.name!r}; install it with "
             "pip install 'lora-one[cli]'.")
from lora_one.core.errors import UsageError

SUBCOMMANDS = (init, finetune, eval, merge, compare, demo, toy)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lora-one", description="Fine-tune Hugging Face models with LoRA-One: LoRA adapters initialised from "
        "the top singular subspace of the one-step full gradient; stock PEFT adapters out.")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in SUBCOMMANDS:
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
    except UsageError as e:
        if os.environ.get("LORA_ONE_DEBUG"):
            raise
        print(f"lora-one {args.command}: error: {e}", file=sys.stderr)
        return 2
    return code if isinstance(code, int) else 0
