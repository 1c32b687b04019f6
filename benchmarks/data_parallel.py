"""`lora-one finetune` in one process against the same run under `torchrun` with 2 processes.

Side by side in one run: training seconds per optimizer step of each and their ratio, and how far the
two adapters and the final eval losses are apart (the micro-batches are split, not changed, so they
should agree up to float rounding). On one machine with 2 GPUs this is DDP's speed-up; on a CPU it
compares 1 process x T threads with 2 processes x T/2 threads, i.e. the cost of gloo and of smaller
per-process matrices on the same cores.

    .venv/bin/python benchmarks/data_parallel.py [--model smollm2-135m --data trec --steps 10]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file


def run(launcher: list[str], args: list[str], out: Path, threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run([*launcher, "-m", "lora_one.cli", *args, "--out", str(out)], env=env,
                          capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{' '.join(launcher)} failed:\n{done.stderr[-3000:]}")
    meta = json.loads((out / "lora_one.json").read_text())["training"]
    return {"train_s": meta["train_seconds"], "steps": meta["steps"], "eval": meta["final_eval"],
            "adapter": load_file(out / "adapter_model.safetensors")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data", default="trec")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=8)
    a = p.parse_args()
    gpus = torch.cuda.device_count()
    procs = max(gpus, 2)
    cores = os.cpu_count() or 2
    args = ["finetune", "--model", a.model, "--data", a.data, "--rank", "8", "--init-samples", "8",
            "--batch-size", str(a.batch_size), "--max-steps", str(a.steps), "--save-every", "0", "--quiet"]
    with tempfile.TemporaryDirectory() as tmp:
        one = run([sys.executable], args, Path(tmp) / "one", threads=cores)
        many = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs)],
                   args, Path(tmp) / "many", threads=max(1, cores // procs))
    device = f"{gpus} GPU(s)" if gpus else f"CPU, {cores} cores"
    print(f"{a.model} on {a.data}, {a.steps} steps of batch {a.batch_size}, {device}")
    for name, r in (("1 process", one), (f"{procs} processes", many)):
        print(f"  {name:<12} {r['train_s'] / r['steps']:.3f} s/step   final eval loss {r['eval']['eval_loss']:.6f}")
    print(f"  speed-up {procs} processes / 1: {one['train_s'] / many['train_s']:.2f}x")
    rel = max(float((many["adapter"][k] - v).norm() / v.norm()) for k, v in one["adapter"].items())
    print(f"  adapters: largest relative difference of a tensor {rel:.2e}; "
          f"eval loss difference {abs(one['eval']['eval_loss'] - many['eval']['eval_loss']):.2e}")


if __name__ == "__main__":
    main()
