"""`--gamma auto` against the fixed gamma 128 after training, on the demo's tasks and settings (issue 11).

Per task (TREC on SmolLM2-135M-Instruct, 40 steps; sentiment on all-MiniLM-L6-v2, 100 steps), `lora-one` at
the demo's learning rate with gamma 128 and with `gamma="auto"`, seeds 0-2, through `lora-one compare`
without a test split: the runs are evaluated on the validation split, as the issue asks (the learning rate
is the demo's, so nothing is chosen on that split here; the auto search picks gamma on held-out training
examples). Per run: the chosen gamma, the step-0 and final validation loss and accuracy, the init's share
of the run's time.

    python benchmarks/gamma_auto_training.py [--out DIR]

The tables go to benchmarks/results/gamma_auto_training.md. The comparisons are resumable (a finished
run is read back); their report.md, summary.json and comparison.png stay in --out.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lora_one.recipes.compare import CompareSettings, run_compare
from lora_one.recipes.demo import DEMOS

RESULT = Path(__file__).parent / "results" / "gamma_auto_training.md"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/gamma_auto_training")
    p.add_argument("--tasks", default="trec,sentiment")
    args = p.parse_args()
    rows = ["Per run, validation split:", "",
            "| task | gamma | seed | chosen gamma | step-0 loss | final loss | final accuracy | init share |",
            "|---|---|---:|---:|---:|---:|---:|---:|"]
    means = []
    for task in args.tasks.split(","):
        demo = DEMOS[task]
        lr = demo.methods["lora-one"]["lr"]
        s = CompareSettings(model=demo.model, data=demo.data, eval_data=demo.val, out=f"{args.out}/{task}",
                            seeds=3, quiet=True, **demo.common)
        summary = run_compare(s, {"lora-one": {"lr": lr}, "lora-one:gamma=auto": {"method": "lora-one", "lr": lr,
                                                                                  "gamma": "auto"}})
        for label, r in summary["methods"].items():
            for run in r["runs"]:
                meta = json.loads((Path(run["folder"]) / "lora_one.json").read_text())
                chosen = meta["gamma_search"]["chosen"] if "gamma_search" in meta else meta["gamma"]
                evals = [m for m in run["metrics"] if "eval_loss" in m]
                share = run["init_seconds"] / (run["init_seconds"] + run["train_seconds"] + run["eval_seconds"])
                rows.append(f"| {task} | {label.partition('=')[2] or '128'} | {run['seed']} | {chosen:g} | "
                            f"{evals[0]['eval_loss']:.4f} | {evals[-1]['eval_loss']:.4f} | "
                            f"{evals[-1]['eval_accuracy']:.3f} | {share:.1%} |")
            end = r["curves"]
            means.append(f"| {task} | {label.partition('=')[2] or '128'} | {end['loss'][0]['mean']:.4f} | "
                         f"{end['loss'][-1]['mean']:.4f} ± {end['loss'][-1]['se']:.4f} | "
                         f"{end['accuracy'][-1]['mean']:.3f} ± {end['accuracy'][-1]['se']:.3f} | "
                         f"{r['init_share']['mean']:.1%} |")
    rows += ["", "Mean ± standard error over seeds 0-2, validation split:", "",
             "| task | gamma | step-0 loss | final loss | final accuracy | init share |",
             "|---|---|---:|---:|---:|---:|", *means]
    RESULT.write_text("\n".join(rows) + "\n")
    print(f"wrote {RESULT}")


if __name__ == "__main__":
    main()
