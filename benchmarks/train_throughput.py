"""Training throughput of a LoRA-One adapter vs a vanilla LoRA adapter, same run settings, side by side.

    python benchmarks/train_throughput.py                      # SmolLM2-135M on TREC, batch 8
    python benchmarks/train_throughput.py --model minilm-l6 --data sentiment --batch-size 16
    python benchmarks/train_throughput.py --methods dora,dora-one   # DoRA-One vs DoRA (ratio to the first)

Every method trains through `lora_one.recipes.finetune.run_finetune`, the recipe of `lora-one finetune` (the
Trainer's loop; its timer covers the training steps alone: forward, backward, clipping and the optimizer
step, not the init, evaluations or checkpoints). The
methods take turns in rounds (lora, lora-one, lora-one + preconditioner, lora, ...) so that a change
of load on a shared machine hits all of them alike; the report gives the median steps/s over rounds
and the ratio to LoRA. Results are appended to benchmarks/results/train_throughput.jsonl.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from lora_one.recipes.finetune import run_finetune
from lora_one.recipes.settings import FinetuneSettings

METHODS = {  # name -> (variant, precondition, use_dora)
    "lora": ("lora", False, False),
    "lora-one": ("lora-one", False, False),
    "lora-one+precond": ("lora-one", True, False),
    "dora": ("lora", False, True),
    "dora-one": ("lora-one", False, True),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data", default="trec")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=6, help="timed steps per method per round")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--methods", default="lora,lora-one,lora-one+precond",
                   help=f"comma-separated, from {','.join(METHODS)}; ratios are to the first")
    args = p.parse_args()
    unknown = set(args.methods.split(",")) - set(METHODS)
    if unknown:
        p.error(f"unknown method(s) {sorted(unknown)}; choose from {','.join(METHODS)}")
    methods = {m: METHODS[m] for m in args.methods.split(",")}
    reference = next(iter(methods))
    if args.threads:
        torch.set_num_threads(args.threads)

    per_round = {name: [] for name in methods}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name, (variant, precondition, dora) in methods.items():
                run = FinetuneSettings(model=args.model, data=args.data, out=str(Path(tmp) / f"{name}-{r}"),
                                       variant=variant, precondition=precondition, dora=dora, lr=2e-4,
                                       max_steps=args.steps, batch_size=args.batch_size, max_length=128, save_every=0,
                                       eval_split=0.01, eval_batch_size=64, quiet=True, seed=r)
                sps = run_finetune(run)["steps_per_second"]
                per_round[name].append(sps)
                print(f"round {r} {name:<18} {sps:.4f} steps/s", flush=True)
    med = {name: statistics.median(v) for name, v in per_round.items()}
    print(f"\n{'method':<18} {'steps/s (median)':>16} {'ratio to ' + reference:>16}")
    for name, v in med.items():
        print(f"{name:<18} {v:>16.4f} {v / med[reference]:>16.3f}")
    out = Path(__file__).parent / "results" / "train_throughput.jsonl"
    out.parent.mkdir(exist_ok=True)
    rec = {"model": args.model, "data": args.data, "batch_size": args.batch_size, "steps": args.steps,
           "rounds": args.rounds, "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
           "steps_per_second": per_round, "median": med,
           "reference": reference, "ratio": {n: round(v / med[reference], 4) for n, v in med.items()},
           "when": time.strftime("%Y-%m-%d %H:%M:%S")}
    with out.open("a") as f:
        f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
