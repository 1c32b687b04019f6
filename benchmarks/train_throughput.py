"""Training throughput of a LoRA-One adapter vs a vanilla LoRA adapter, same run settings, side by side.

    python benchmarks/train_throughput.py                      # SmolLM2-135M on TREC, batch 8
    python benchmarks/train_throughput.py --model minilm-l6 --data sentiment --batch-size 16
    python benchmarks/train_throughput.py --methods dora,dora-one   # DoRA-One vs DoRA (ratio to the first)

Every method trains through the same `lora_one.train.train` loop as `lora-one finetune` (the timer
covers forward, backward, clipping and the optimizer step; not the init, evals or checkpoints). The
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
from peft import LoraConfig

from lora_one.data import causal_lm_features, classification_features, init_batches, label_mapping, read_records
from lora_one.init import get_lora_one_model
from lora_one.models import CAUSAL_LM, load_model
from lora_one.train import TrainSettings, train

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

    models, feats, pad = {}, None, None
    for name, (variant, _, dora) in methods.items():
        probe_model, tok, task = load_model(args.model, num_labels=2 if args.data.startswith("sentiment") else None)
        records = read_records(args.data, task)
        if task == CAUSAL_LM:
            feats = causal_lm_features(records, tok, 128)
        else:
            feats = classification_features(records, tok, 128, label_mapping(records))
        pad = tok.pad_token_id
        config = LoraConfig(r=8, lora_alpha=16, use_rslora=True, use_dora=dora, target_modules="all-linear",
                            task_type="CAUSAL_LM" if task == CAUSAL_LM else "SEQ_CLS")
        models[name] = get_lora_one_model(probe_model, config, init_batches(feats, 8, 1, 0, pad), variant=variant,
                                          progress=False)
    per_round = {name: [] for name in methods}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name, (_, precondition, _) in methods.items():
                s = TrainSettings(lr=2e-4, max_steps=args.steps, batch_size=args.batch_size, precondition=precondition,
                                  save_every=0, progress=False, seed=r)
                res = train(models[name], feats, pad, s, Path(tmp) / f"{name}-{r}")
                per_round[name].append(res.steps_per_second)
                print(f"round {r} {name:<18} {res.steps_per_second:.4f} steps/s", flush=True)
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
