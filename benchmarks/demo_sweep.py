"""The small sweep that picked the demo's defaults, on the VALIDATION split only (never the test split).

    python benchmarks/demo_sweep.py --task trec --round lr        # learning rate per method
    python benchmarks/demo_sweep.py --task trec --round extra     # preconditioner damping
    python benchmarks/demo_sweep.py --task sentiment --round probe  # the linear-probe head alone
    python benchmarks/demo_sweep.py --task sentiment --round lr    # head init x method

Each configuration trains with the demo's data order and step budget and is scored on `<task>:val`
at the end; results are appended to benchmarks/results/demo_sweep_<task>.jsonl, and configurations
already there are skipped, so an interrupted sweep continues where it stopped. docs/demo.md holds the
results and the choice made from them.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from lora_one.recipes.compare import step0_key
from lora_one.recipes.demo import DEMOS
from lora_one.recipes.finetune import run_finetune
from lora_one.recipes.settings import FinetuneSettings

RESULTS = Path(__file__).parent / "results"

PRECOND = {"method": "lora-one", "precondition": True}
ROUNDS = {  # in the order they ran; a configuration already in the results file is skipped
    "trec": {
        "lr": [
            {"method": "lora", "lr": 5e-4}, {"method": "lora", "lr": 1e-3},
            {"method": "lora-one", "lr": 5e-4}, {"method": "lora-one", "lr": 1e-3},
            {**PRECOND, "prec_reg": 1e-6, "lr": 2e-4}, {**PRECOND, "prec_reg": 1e-6, "lr": 5e-4},
            {"method": "lora", "lr": 2e-4}, {"method": "lora-one", "lr": 2e-4},
        ],
        "extra": [
            {"method": "lora-one", "lr": 5e-4, "gamma": 32.0},
            {**PRECOND, "prec_reg": 1e-6, "lr": 1e-3},
            {**PRECOND, "prec_reg": 1e-4, "lr": 5e-4},
            {**PRECOND, "prec_reg": 1e-2, "lr": 5e-4},
        ],
    },
    "sentiment": {
        "lr": [
            {"method": "lora", "lr": 5e-4, "head_init": "random"},
            {"method": "lora", "lr": 5e-4, "head_init": "probe"},
            {"method": "lora-one", "lr": 5e-4, "head_init": "probe"},
            {"method": "lora-one", "lr": 5e-4, "head_init": "probe", "gamma": 1024.0},
            {"method": "lora-one", "lr": 5e-4, "head_init": "random"},
        ],
        "extra": [{"method": "lora-one", "lr": 5e-4, "head_init": "probe", "gamma": 8192.0}],
    },
}


def probe_study(seed: int, samples=(1000, 2000), l2s=(1e-4, 1e-3, 1e-2)) -> list[dict]:
    """Validation accuracy of the linear-probe head alone (frozen MiniLM features) per L2 penalty."""
    import torch

    from lora_one.recipes.data import classification_features, label_mapping, read_records
    from lora_one.recipes.models import load_model
    from lora_one.recipes.probe import fit_logistic, head_inputs

    train_recs = read_records("sentiment", "classification")
    label2id = label_mapping(train_recs)
    model, tok, _ = load_model("minilm-l6", "classification", num_labels=len(label2id))
    feats = classification_features(train_recs, tok, 128, label2id)
    val = classification_features(read_records("sentiment:val", "classification"), tok, 128, label2id)
    import random

    idx = random.Random(seed).sample(range(len(feats)), max(samples))
    X = head_inputs(model, [feats[i] for i in idx], tok.pad_token_id)
    y = torch.tensor([feats[i]["labels"] for i in idx])
    Xv = head_inputs(model, val, tok.pad_token_id)
    yv = torch.tensor([f["labels"] for f in val])
    rows = []
    for n in samples:
        for l2 in l2s:
            W, b = fit_logistic(X[:n], y[:n], len(label2id), l2)
            logits = Xv.double() @ W.T + b
            rows.append({"probe_samples": n, "probe_l2": l2,
                         "val_accuracy": round(float((logits.argmax(1) == yv).double().mean()), 4),
                         "val_loss": round(float(torch.nn.functional.cross_entropy(logits, yv)), 4)})
            print(rows[-1], flush=True)
    return rows


def print_report(path: Path) -> None:
    print("| method | lr | setting | steps | val accuracy | val loss | train s |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for line in path.read_text().splitlines():
        r = json.loads(line)
        c = dict(r["config"])
        name = c.pop("method") + (" + precond" if c.pop("precondition", False) else "")
        lr = c.pop("lr")
        rest = ", ".join(f"{k}={v}" for k, v in c.items()) or "-"
        print(f"| {name} | {lr:g} | {rest} | {r['steps']} | {r['val_accuracy']:.4f} | {r['val_loss']:.4f} "
              f"| {r['train_seconds']:.0f} |")


def key_of(config: dict) -> str:
    return json.dumps(config, sort_keys=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=tuple(ROUNDS), default="trec")
    p.add_argument("--round", default="lr")
    p.add_argument("--config", action="append", default=[], help="extra configuration as JSON (repeatable)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--report", action="store_true", help="print the results so far as a markdown table")
    args = p.parse_args()
    if args.report:
        print_report(RESULTS / f"demo_sweep_{args.task}.jsonl")
        return
    demo = DEMOS[args.task]
    if args.round == "probe":
        rows = probe_study(args.seed)
        (RESULTS / "probe_study_sentiment.json").write_text(json.dumps(rows, indent=2) + "\n")
        return
    configs = ROUNDS[args.task].get(args.round, []) + [json.loads(c) for c in args.config]
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"demo_sweep_{args.task}.jsonl"
    done = {}
    if path.exists():
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            done[key_of({**rec["config"], "seed": rec["seed"]})] = rec
    step0_cache = {r["init_key"]: r["step0"] for r in done.values()}
    for config in configs:
        if key_of({**config, "seed": args.seed}) in done:
            print("skip (done):", config)
            continue
        # results recorded before the settings were named by the Trainer rebuild say "method" for "variant"
        settings = {**demo.common, "eval_every": 0, **{"variant" if k == "method" else k: v for k, v in config.items()}}
        with tempfile.TemporaryDirectory() as tmp:
            fa = FinetuneSettings(model=demo.model, data=demo.data, eval_data=f"{demo.data}:val", out=tmp,
                                  seed=args.seed, overwrite=True, quiet=True, save_every=0, **settings)
            init_key = step0_key(fa)
            t = time.perf_counter()
            summary = run_finetune(fa, step0_eval=step0_cache.get(init_key))
        step0 = {k[5:]: v for k, v in summary["step0_eval"].items() if k.startswith("eval_")}
        step0_cache.setdefault(init_key, step0)
        rec = {
            "config": config, "seed": args.seed, "steps": summary["steps"], "init_key": init_key, "step0": step0,
            "val_accuracy": summary["final_eval"]["eval_accuracy"], "val_loss": summary["final_eval"]["eval_loss"],
            "init_seconds": summary["init_seconds"], "train_seconds": summary["train_seconds"],
            "wall_seconds": round(time.perf_counter() - t, 1),
        }
        with path.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        print(f"{config}: val accuracy {rec['val_accuracy']:.4f}, loss {rec['val_loss']:.4f} "
              f"({rec['wall_seconds']:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
