"""`gamma="auto"`: which samples the line search should use, what it picks, and what it costs.

The demo's settings (rank 8, alpha 16, rsLoRA, all linear layers, max length 128, accumulate mode):
TREC on SmolLM2-135M-Instruct (8 init samples, micro-batches of 1) and sentiment on all-MiniLM-L6-v2
(32 init samples in micro-batches of 8; the demo's random head, and a probe-fitted head), seeds 0-2.
Per case: one gradient and one SVD, then the step-0 loss (token-weighted, as the gradient's) at every
gamma of a wide grid (4 ... 16384) on (a) the init samples, (b) as many other training samples, (c) the
validation split (its first 32 examples for TREC, 192 for sentiment: CPU time). The default search
(`DEFAULT_GAMMA_GRID` on the init samples) is timed on its own: its time is the extra cost of
`gamma="auto"`, given as a share of the init (gradient + SVD) and of the init plus the demo's training
steps (their time estimated from 3 steps timed in the same process, one thread).

    python benchmarks/gamma_auto.py [--tasks trec,sentiment,sentiment-probe] [--seeds 0,1,2] > results.jsonl
    python benchmarks/gamma_auto.py --summary results.jsonl

One JSON line per case on stdout (benchmarks/results/gamma_auto.jsonl) and a line per case on stderr;
`--summary` prints the table of benchmarks/results/gamma_auto.txt from the JSON lines.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time

import torch

WIDE = tuple(2.0**k for k in range(2, 15))  # 4 ... 16384
R, ALPHA, MAX_LEN = 8, 16.0, 128
TASKS = {  # model, data, init samples, init micro-batch size, head, validation examples (the split's first),
    # the demo's batch size and steps
    "trec": ("smollm2-135m", "trec", 8, 1, None, 32, 8, 40),
    "sentiment": ("minilm-l6", "sentiment", 32, 8, "random", 192, 16, 100),
    "sentiment-probe": ("minilm-l6", "sentiment", 32, 8, "probe", 192, 16, 100),
}


def step_seconds(peft_model, feats, pad: int, batch_size: int, steps: int = 3) -> float:
    """Median wall time of a LoRA training step (AdamW, one micro-batch of the demo's batch size), after a
    warm-up step: measured in the same process as the search, so under the same load."""
    from lora_one import create_optimizer
    from lora_one.recipes.data import collate

    opt = create_optimizer(peft_model, lr=1e-4)
    peft_model.train()
    times = []
    for i in range(steps + 1):
        batch = collate(feats[i * batch_size : (i + 1) * batch_size], pad)
        t0 = time.perf_counter()
        peft_model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    peft_model.eval()
    return statistics.median(times[1:])


def case(task: str, seed: int) -> dict:
    from peft import LoraConfig, get_peft_model

    from lora_one import estimate_gradients
    from lora_one.core.constants import DEFAULT_GAMMA_GRID
    from lora_one.core.init import search_gamma
    from lora_one.linalg.spectral import top_svd
    from lora_one.recipes.data import (
        causal_lm_features,
        classification_features,
        collate,
        init_batches,
        init_sample_indices,
        label_mapping,
    )
    from lora_one.recipes.embedded_data import load as load_data
    from lora_one.recipes.models import load_model
    from lora_one.recipes.probe import probe_head

    model_name, data, n_init, batch_size, head, n_val, train_batch, train_steps = TASKS[task]
    train, val = load_data(f"{data}:train"), load_data(f"{data}:val")[:n_val]
    torch.manual_seed(seed)  # the fresh classification head
    if head is None:
        model, tok, _ = load_model(model_name, "causal-lm")
        feats, val_feats = (causal_lm_features(recs, tok, MAX_LEN) for recs in (train, val))
    else:
        label2id = label_mapping(train)
        model, tok, _ = load_model(model_name, "classification", num_labels=len(label2id))
        feats, val_feats = (classification_features(recs, tok, MAX_LEN, label2id) for recs in (train, val))
        if head == "probe":
            probe_head(model, feats, tok.pad_token_id, 2000, seed, 1e-4)  # the CLI defaults
    pad = tok.pad_token_id
    batches = init_batches(feats, n_init, batch_size, seed, pad)
    used = set(init_sample_indices(len(feats), n_init, seed))
    others = random.Random(seed + 10_000).sample([i for i in range(len(feats)) if i not in used], n_init)
    held_out = [collate([feats[i] for i in others[j : j + batch_size]], pad) for j in range(0, n_init, batch_size)]
    val_batches = [collate(val_feats[j : j + 16], pad) for j in range(0, len(val_feats), 16)]

    config = LoraConfig(r=R, lora_alpha=ALPHA, use_rslora=True, target_modules="all-linear",
                        task_type="CAUSAL_LM" if head is None else "SEQ_CLS")
    t0 = time.perf_counter()
    grads = estimate_gradients(model, batches, show_progress_bar=False, rank=R, seed=seed, init_samples=None)
    t1 = time.perf_counter()
    svds = {name: top_svd(g, R, "randomized", seed) for name, g in grads.items()}
    t2 = time.perf_counter()
    peft_model = get_peft_model(model, config)
    auto = search_gamma(peft_model, svds, batches, grid="auto")  # exactly what gamma="auto" adds
    searches = {name: search_gamma(peft_model, svds, b, grid=WIDE)
                for name, b in (("init", batches), ("held_out", held_out), ("val", val_batches))}
    val = dict(zip(WIDE, searches["val"]["losses"]))

    def best(losses, grid):  # the gamma a search over `grid` would choose with these losses
        return min((loss, g) for g, loss in zip(WIDE, losses) if g in grid and loss is not None)[1]

    chosen = {f"{name} ({grid_name})": best(s["losses"], grid) for name, s in searches.items()
              for grid_name, grid in (("default grid", DEFAULT_GAMMA_GRID), ("wide grid", WIDE))}
    assert chosen["init (default grid)"] == auto["chosen"], (chosen, auto)
    init_seconds = t2 - t0
    train_seconds = train_steps * step_seconds(peft_model, feats, pad, train_batch)
    return {
        "task": task, "seed": seed, "init_samples": n_init, "val_examples": len(val_feats),
        "gradient_seconds": round(t1 - t0, 3), "svd_seconds": round(t2 - t1, 3),
        "search_seconds": auto["seconds"], "search_share_of_init": round(auto["seconds"] / init_seconds, 3),
        "train_seconds_estimate": round(train_seconds, 1),
        "search_share_of_run": round(auto["seconds"] / (init_seconds + auto["seconds"] + train_seconds), 4),
        "chosen": chosen,
        "val_loss_at": {"gamma 128": val[128.0], **{k: val[g] for k, g in chosen.items()}},
        "grid": list(WIDE),
        "losses": {name: s["losses"] for name, s in searches.items()},
        "loss_without_step": {name: s["loss_without_step"] for name, s in searches.items()},
    }


def summary(rows: list[dict]) -> str:
    """Per task, means over the seeds: validation loss at each choice of gamma, and the search's cost."""
    choices = {"no step": None, "gamma 128": "gamma 128", "auto on init samples": "init (default grid)",
               "auto on held-out samples": "held_out (default grid)",
               "best on val (default grid)": "val (default grid)",
               "best on val (wide grid)": "val (wide grid)"}
    lines = ["step-0 validation loss (mean over seeds; chosen gammas per seed in brackets) and the search's cost",
             "", f"| task | {' | '.join(choices)} | search s | search / init | search / (init + training) |",
             "|---" * (len(choices) + 4) + "|"]
    for task in dict.fromkeys(r["task"] for r in rows):
        mine = [r for r in rows if r["task"] == task]
        cells = []
        for key in choices.values():
            loss = statistics.mean(r["loss_without_step"]["val"] if key is None else r["val_loss_at"][key]
                                   for r in mine)
            gammas = ", ".join(f"{r['chosen'][key]:g}" for r in mine) if key in mine[0]["chosen"] else ""
            picked = f" ({gammas})" if gammas else ""
            cells.append(f"{loss:.3f}{picked}")
        cost = [statistics.mean(r[k] for r in mine) for k in
                ("search_seconds", "search_share_of_init", "search_share_of_run")]
        lines.append(f"| {task} | {' | '.join(cells)} | {cost[0]:.1f} | {cost[1]:.1f}x | {100 * cost[2]:.0f}% |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--summary", help="print the summary table of a JSON lines file this script wrote")
    args = p.parse_args()
    if args.summary:
        with open(args.summary) as f:
            print(summary([json.loads(line) for line in f]))
        return
    torch.set_num_threads(1)  # on a shared 2-core machine, two threads made every timing 5x slower
    rows = []
    for task in args.tasks.split(","):
        for seed in map(int, args.seeds.split(",")):
            row = case(task, seed)
            rows.append(row)
            print(json.dumps(row), flush=True)
            v = row["val_loss_at"]
            print(f"{task:16} seed {seed}: auto (init samples) gamma {row['chosen']['init (default grid)']:>6g} "
                  f"val {v['init (default grid)']:.3f} | held-out samples gamma "
                  f"{row['chosen']['held_out (default grid)']:>6g} val {v['held_out (default grid)']:.3f} | "
                  f"gamma 128 val {v['gamma 128']:.3f} | best on val (wide) {row['chosen']['val (wide grid)']:>6g} "
                  f"val {v['val (wide grid)']:.3f} | without step {row['loss_without_step']['val']:.3f} | "
                  f"search {row['search_seconds']:.1f} s = {100 * row['search_share_of_init']:.0f}% of the init, "
                  f"{100 * row['search_share_of_run']:.1f}% of a demo run's init and training", file=sys.stderr,
                  flush=True)


if __name__ == "__main__":
    main()
