"""Steps per second of `lora-one finetune` on `transformers.Trainer` vs the hand-written loop it replaced.

    python benchmarks/trainer_vs_loop.py                       # old loop: commit 07f7989 (before the rebuild)
    python benchmarks/trainer_vs_loop.py --old REV --rounds 3 --steps 20

The old revision is checked out into a temporary git worktree and run from there; both run the demo's
TREC settings (SmolLM2-135M, batch 8, rank 8, max length 128, lr 5e-4, LoRA-One) as a command, taking
turns in rounds so that a change of load on a shared machine hits both alike. Each run's steps/s is the
one its `lora_one.json` records: training steps alone (forward, backward, clipping, optimizer step),
not the init, evaluations or checkpoints. The held-out set is 8 TREC validation records, so that
evaluations stay short. Results are appended to benchmarks/results/trainer_vs_loop.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lora_one.recipes.embedded_data import load

ROOT = Path(__file__).resolve().parent.parent
COMMON = ["--model", "smollm2-135m", "--data", "trec", "--batch-size", "8", "--rank", "8", "--max-length", "128",
          "--lr", "5e-4", "--save-every", "0", "--quiet"]


def run(src: Path, variant_flag: str, out: Path, eval_data: Path, steps: int, seed: int) -> float:
    env = {**os.environ, "PYTHONPATH": str(src)}
    args = [sys.executable, "-m", "lora_one.cli", "finetune", *COMMON, variant_flag, "lora-one",
            "--max-steps", str(steps), "--eval-data", str(eval_data), "--seed", str(seed), "--out", str(out)]
    done = subprocess.run(args, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return json.loads((out / "lora_one.json").read_text())["training"]["steps_per_second"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--old", default="07f7989", help="git revision of the hand-written loop")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    sps = {"loop": [], "trainer": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tmp / "old"), args.old],
                       check=True, capture_output=True)
        try:
            eval_data = tmp / "val8.jsonl"
            eval_data.write_text("".join(json.dumps(r) + "\n" for r in load("trec:val")[:8]))
            for r in range(args.rounds):
                for name, src, flag in (("loop", tmp / "old" / "src", "--method"), ("trainer", ROOT / "src", "--variant")):
                    sps[name].append(run(src, flag, tmp / f"{name}-{r}", eval_data, args.steps, r))
                    print(f"round {r} {name:<8} {sps[name][-1]:.4f} steps/s", flush=True)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tmp / "old")], check=True)
    med = {name: statistics.median(v) for name, v in sps.items()}
    ratio = med["trainer"] / med["loop"]
    print(f"median steps/s: loop {med['loop']:.4f}, trainer {med['trainer']:.4f}; trainer / loop = {ratio:.3f}")
    rec = {"old": args.old, "steps": args.steps, "rounds": args.rounds, "steps_per_second": sps, "median": med,
           "ratio_trainer_to_loop": round(ratio, 4), "when": time.strftime("%Y-%m-%d %H:%M:%S")}
    out = ROOT / "benchmarks" / "results" / "trainer_vs_loop.jsonl"
    with out.open("a") as f:
        f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
