"""`lora-one demo`: the main job, LoRA vs LoRA-One on an embedded task, with a report (a preset of
`lora-one compare`)."""

from __future__ import annotations

from lora_one.cli.args import add_old_flag
from lora_one.cli.compare import interruptible
from lora_one.core.errors import UsageError
from lora_one.recipes.demo import DEMOS, run_demo


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="the main job: LoRA vs LoRA-One on an embedded task, with a report")
    p.add_argument("--task", choices=tuple(DEMOS), default="trec",
                   help="trec: SmolLM2 + TREC question types (causal LM); sentiment: MiniLM + Rotten Tomatoes")
    p.add_argument("--out", help="default: runs/demo (trec) or runs/demo-sentiment")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", type=int, default=1, help="runs per method, with seeds --seed, --seed + 1, ...")
    p.add_argument("--max-steps", type=int, help="optimizer steps per method (default: the demo's)")
    add_old_flag(p, "--steps", "--max-steps")
    p.add_argument("--methods", help="comma-separated subset of the demo's methods")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--overwrite", action="store_true",
                   help="run again the finished runs in --out made with other settings (default: refuse)")
    p.set_defaults(func=cmd)


def cmd(args) -> dict:
    methods = [m.strip() for m in args.methods.split(",")] if args.methods else None
    if args.max_steps is not None and args.max_steps < 1:
        raise UsageError(f"--max-steps must be >= 1, got {args.max_steps}.")
    with interruptible():
        return run_demo(args.task, args.out, args.seed, args.max_steps, methods, args.quiet, args.seeds,
                        args.overwrite)
