"""The quality benchmark: `lora-one compare` on four embedded tasks, every method, 3 seeds, two budgets,
the levers the paper points at, and the core methods each at its own learning rate (issue 13).
docs/benchmark.md holds the results and their reading.

Tasks (the embedded data, `lora_one.recipes.embedded_data`):
- `sentiment`: all-MiniLM-L6-v2 classifying Rotten Tomatoes snippets (2 labels; 500 of the 1,000 test
  examples, the same fixed sample for every run);
- `trec-cls`: all-MiniLM-L6-v2 classifying TREC questions by type (6 labels, the 500 test questions);
- `unicode`: SmolLM2-135M-Instruct writing a character's Unicode name (several tokens): loss on compare's
  default sample of 100 of the 300 test records, exact match by greedy generation on 64 of those, at most
  16 new tokens (14% of the test names are longer, so exact match cannot pass about 0.86);
- `dialog`: SmolLM2-135M-Instruct replying to a line of a film (open replies: loss on 200 test records;
  exact match on 32, which is near zero for every method).

Every run: rank 8, alpha 16 (rsLoRA), gamma 128, all linear layers, a constant learning rate after 4
warm-up steps. Under a constant schedule the first 40 steps of a longer run are those of a 40-step run,
so the budgets differ only in length. Learning rates are fixed per method, those the demo's sweep chose on
the TREC validation split (docs/demo.md): 5e-4, and 1e-3 with damping 1e-6 for the preconditioned
variant, except in the `tuned` stage. Every number is on the test split, which nothing has seen.

Stages, each a comparison per task in --out (resumable: a finished run is read back):
- `short`: every method, 40 steps, evaluated at steps 0 and 40 (CPU: the SmolLM2 tasks take batches of 4,
  MiniLM 16);
- `long`: lora, lora-one and lora-one+precond, 160 steps, evaluated at steps 0, 80 and 160;
- `levers`: lora-one (lora-one+precond for the damping) changed one setting at a time, 40 steps:
  init samples 8 -> 64 (MiniLM 32 -> 64), gamma 128 -> auto, no warm-up, rank 8 -> 32, damping 1e-6 -> 1e-4/1e-2.
- `tuned`: lora, lora-one and lora-one+precond, 40 steps, each at the learning rate of 2.5e-4 ... 4e-3 that
  did best on the validation split with seed 0 (`compare`'s choice; by accuracy on MiniLM, by loss on SmolLM2,
  where exact match is near zero), so that a win is not one of step size.

    python benchmarks/quality.py --stage short --tasks sentiment,trec-cls [--threads 1]
    python benchmarks/quality.py --stage levers --tasks unicode --methods lora-one+precond:prec_reg=1e-4
    python benchmarks/quality.py --summary > benchmarks/results/quality/summary.md

Each comparison's report.md, summary.json and comparison.png are copied to
benchmarks/results/quality/<stage>-<task>.*, with the seconds it took in <stage>-<task>.seconds (summed over
the calls, so a resumed stage counts every part).
`--summary` reads them back into one table per stage and task: each method's final metric and loss, its difference to
LoRA with the standard error of the difference, and the verdict (win or loss beyond 2 standard errors, else tie).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from lora_one.recipes.compare import CompareSettings, difference, run_compare

RESULTS = Path(__file__).parent / "results" / "quality"
COMMON = dict(rank=8, alpha=16.0, gamma=128.0, schedule="constant_with_warmup", warmup_steps=4, max_length=128)
MINILM = dict(model="minilm-l6", batch_size=16, init_samples=32, init_batch_size=8, eval_batch_size=64,
              head_init="random", eval_samples=500)
# select_by loss: a few greedy answers of 64 are exact, too few to tell learning rates apart (tuned stage)
SMOLLM = dict(model="smollm2-135m", batch_size=4, init_samples=8, eval_batch_size=16, max_new_tokens=16,
              select_by="loss")
TASKS = {
    "sentiment": dict(MINILM, data="sentiment"),
    "trec-cls": dict(MINILM, data="trec", task="classification", format="text-label", text_field="question",
                     label_field="response"),
    "unicode": dict(SMOLLM, data="unicode", generate_samples=64),
    "dialog": dict(SMOLLM, data="dialog", eval_samples=200, generate_samples=32),
}
LR = 5e-4
PRECOND = {"method": "lora-one+precond", "lr": 1e-3, "prec_reg": 1e-6}
METHODS = {
    "lora": {"lr": LR}, "lora-one": {"lr": LR}, "lora-one+precond": PRECOND, "pissa": {"lr": LR},
    "lora-ga": {"lr": LR}, "dora": {"lr": LR}, "dora-one": {"lr": LR},
}
CORE = ("lora", "lora-one", "lora-one+precond")


ONE = {"method": "lora-one", "lr": LR}
LEVERS = {  # one setting changed at a time; each is compared with the short stage's runs of its method
    # (the label before the colon), which are not run again here
    "lora-one:init_samples=64": {**ONE, "init_samples": 64},
    "lora-one:gamma=auto": {**ONE, "gamma": "auto"},
    "lora-one:warmup=0": {**ONE, "warmup_steps": 0, "warmup_ratio": 0.0},  # warmup_steps=0 alone: the 3% ratio
    "lora-one:rank=32": {**ONE, "rank": 32},
    "lora-one+precond:prec_reg=1e-4": {**PRECOND, "prec_reg": 1e-4},
    "lora-one+precond:prec_reg=1e-2": {**PRECOND, "prec_reg": 1e-2},
}
LR_GRID = [2.5e-4, 5e-4, 1e-3, 2e-3, 4e-3]  # half to 8x the fixed rate: a random head may want large steps
TUNED = {m: {**METHODS[m], "lr": LR_GRID} for m in CORE}  # a list is a grid: chosen on validation, seed 0
STAGES = {  # stage -> (steps, evaluation every, methods)
    "short": (40, 40, METHODS),
    "long": (160, 80, {m: METHODS[m] for m in CORE}),
    "levers": (40, 40, LEVERS),
    "tuned": (40, 40, TUNED),
}
BUDGETS = {  # the stages compared with LoRA, as the verdict tables name them
    "short": "short budget", "long": "long budget",
    "tuned": "short budget, learning rate per method"}


def run_stage(stage: str, task: str, out: Path, only: list[str] | None = None) -> None:
    steps, every, methods = STAGES[stage]
    methods = {m: methods[m] for m in only} if only else methods
    name = f"{stage}-{task}"
    settings = CompareSettings(**COMMON, **TASKS[task], eval_data=f"{TASKS[task]['data']}:val",
                               test_data=f"{TASKS[task]['data']}:test", out=str(out / name), max_steps=steps,
                               eval_every=every, seeds=3, quiet=True)
    t0 = time.perf_counter()
    try:
        run_compare(settings, methods, what=f"{task}, {BUDGETS.get(stage, 'levers')} ({steps} steps)")
    finally:  # an interrupted call's time counts too; its finished runs are read back later almost free
        seconds = time.perf_counter() - t0
        RESULTS.mkdir(parents=True, exist_ok=True)
        timer = RESULTS / f"{name}.seconds"  # summed over the stage's calls
        total = seconds + (float(timer.read_text()) if timer.exists() else 0.0)
        timer.write_text(f"{total:.0f}\n")
    report = (out / name / "report.md").read_text()
    (RESULTS / f"{name}.md").write_text(report.replace("](comparison.png)", f"]({name}.png)"))
    shutil.copyfile(out / name / "summary.json", RESULTS / f"{name}.json")
    shutil.copyfile(out / name / "comparison.png", RESULTS / f"{name}.png")
    print(f"{name}: {seconds:.0f} s ({total:.0f} s over every call)", flush=True)


def verdict(diff: dict, higher_is_better: bool) -> str:
    if diff["se"] is None or abs(diff["diff"]) <= 2 * diff["se"]:
        return "tie"
    return "win" if (diff["diff"] > 0) == higher_is_better else "loss"


def _diff_cells(d: dict, digits: int, higher_is_better: bool) -> list[str]:
    """A difference ± its se, and its verdict."""
    return [f"{d['diff']:+.{digits}f} ± {d['se']:.{digits}f}", verdict(d, higher_is_better)]


def _cells(end: dict, vs: dict | None, metric: str) -> list[str]:
    cells = [f"{end[metric]['mean']:.3f} ± {end[metric]['se']:.3f}"]
    cells += _diff_cells(vs[metric], 3, True) if vs else ["", ""]
    cells.append(f"{end['loss']['mean']:.4f} ± {end['loss']['se']:.4f}")
    cells += _diff_cells(vs["loss"], 4, False) if vs else ["", ""]
    return cells


def _header(s: dict, against: str) -> list[str]:
    metric = s["metric"]
    return [f"### {s['what']}", "", f"{s['model']}, step {s['steps']}, test split ({s['eval_n']} records), mean ± se "
            f"over seeds {s['seeds']}; difference to {against} ± se of the difference; win or loss: beyond 2 se.",
            "", f"| method | lr | {metric} | vs {against} | | loss | vs {against} | | steps to lora's final loss |",
            "|---|---:|---:|---:|---|---:|---:|---|---:|"]


def _seconds(name: str) -> list[str]:
    seconds = RESULTS / f"{name}.seconds"
    return ["", f"Time of the stage: {seconds.read_text().strip()} s.", ""]


def _steps(step: int | None) -> str:
    return "not reached" if step is None else str(step)


def summary_table(name: str) -> list[str]:
    s = json.loads((RESULTS / f"{name}.json").read_text())
    rows = _header(s, "lora")
    for label, r in s["methods"].items():
        end = {k: v[-1] for k, v in r["curves"].items()}
        vs = {k: v[-1] for k, v in r["vs_lora"].items()} if r["vs_lora"] else None
        rows.append("| " + " | ".join([label, f"{r['chosen']['lr']:g}", *_cells(end, vs, s["metric"]),
                                       _steps(r["steps_to_lora_final_loss"])]) + " |")
    return rows + _seconds(name)


def _vs_its_method(label: str, lever: dict, short: dict, key: str) -> dict:
    """A lever's runs minus the short stage's runs of its method (the label before the colon), at the last step."""
    return difference(lever["runs"], short[label.partition(":")[0]]["runs"], key)[-1]


def lever_table(task: str) -> list[str]:
    """Each lever against the short stage's runs of its method (same seeds, data order and budget)."""
    s = json.loads((RESULTS / f"levers-{task}.json").read_text())
    rows = _header(s, "its method")[:-2] + [
        f"| lever | {s['metric']} | vs its method | | loss | vs its method | |", "|---|---:|---:|---|---:|---:|---|"]
    if not (RESULTS / f"short-{task}.json").exists():
        return [*rows[:2], "(no short stage of this task yet: nothing to compare the levers with)", ""]
    short = json.loads((RESULTS / f"short-{task}.json").read_text())["methods"]
    for base in dict.fromkeys(label.partition(":")[0] for label in s["methods"]):
        end = {k: v[-1] for k, v in short[base]["curves"].items()}
        rows.append("| " + " | ".join([f"{base} (short stage)", *_cells(end, None, s["metric"])]) + " |")
        for label, r in s["methods"].items():
            if label.partition(":")[0] == base:
                end = {k: v[-1] for k, v in r["curves"].items()}
                vs = {k: _vs_its_method(label, r, short, k) for k in r["curves"]}
                rows.append("| " + " | ".join([label, *_cells(end, vs, s["metric"])]) + " |")
    return rows + _seconds(f"levers-{task}")


def lever_verdicts() -> list[str]:
    """Levers x tasks: each lever's loss minus its method's (short stage, same seeds) ± se, and the verdict."""
    done = [t for t in TASKS if (RESULTS / f"levers-{t}.json").exists() and (RESULTS / f"short-{t}.json").exists()]
    if not done:
        return []
    levers = {t: json.loads((RESULTS / f"levers-{t}.json").read_text())["methods"] for t in done}
    short = {t: json.loads((RESULTS / f"short-{t}.json").read_text())["methods"] for t in done}
    rows = ["### Levers (40 steps): loss minus that of the lever's method", "",
            "| lever | " + " | ".join(done) + " |", "|---|" + "---:|" * len(done)]
    for label in LEVERS:
        cells = []
        for t in done:
            r = levers[t].get(label)
            d = _vs_its_method(label, r, short[t], "loss") if r else None
            cells.append(" ".join(_diff_cells(d, 4, False)) if d else "not run")
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    return rows + [""]


def verdict_tables() -> list[str]:
    """Per budget and quantity, methods x tasks: the difference to LoRA ± se and its verdict."""
    rows = []
    for stage in BUDGETS:
        runs = {t: json.loads((RESULTS / f"{stage}-{t}.json").read_text()) for t in TASKS
                if (RESULTS / f"{stage}-{t}.json").exists()}
        if not runs:
            continue
        steps = next(iter(runs.values()))["steps"]
        labels = list(dict.fromkeys(m for s in runs.values() for m, r in s["methods"].items() if r["vs_lora"]))
        for quantity in ("metric", "loss"):
            what = "accuracy or exact match" if quantity == "metric" else "loss"
            rows += [f"### {BUDGETS[stage]} ({steps} steps): {what} minus LoRA's", "",
                     "| method | " + " | ".join(f"{t} ({s['metric'] if quantity == 'metric' else 'loss'})"
                                              for t, s in runs.items()) + " |",
                     "|---|" + "---:|" * len(runs)]
            for label in labels:
                cells = []
                for s in runs.values():
                    r = s["methods"].get(label)
                    if r is None or not r["vs_lora"]:
                        cells.append("")
                        continue
                    d = r["vs_lora"][s["metric"] if quantity == "metric" else "loss"][-1]
                    cells.append(" ".join(_diff_cells(d, 3 if quantity == "metric" else 4, quantity == "metric")))
                rows.append(f"| {label} | " + " | ".join(cells) + " |")
            rows.append("")
    return rows


def plot_differences(path: Path) -> None:
    """One panel per budget and quantity: each method's difference to LoRA per task, ± 2 se (paired)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = [stage for stage in BUDGETS if any((RESULTS / f"{stage}-{t}.json").exists() for t in TASKS)]
    fig, axes = plt.subplots(len(budgets), 2, figsize=(11, 4.5 * len(budgets)), squeeze=False)
    for row, stage in zip(axes, budgets):
        runs = {t: json.loads((RESULTS / f"{stage}-{t}.json").read_text()) for t in TASKS
                if (RESULTS / f"{stage}-{t}.json").exists()}
        for ax, quantity in zip(row, ("metric", "loss")):
            ticks, labels, y = [], [], 0.0
            for task, s in runs.items():
                key = s["metric"] if quantity == "metric" else "loss"
                for i, (label, r) in enumerate(s["methods"].items()):
                    if r["vs_lora"]:
                        d = r["vs_lora"][key][-1]
                        ax.errorbar(d["diff"], -y, xerr=2 * (d["se"] or 0), fmt="o", color=f"C{i}", capsize=3)
                        ticks.append(-y)
                        labels.append(f"{task}: {label}")
                        y += 1
                y += 0.5  # a gap between tasks
            ax.axvline(0, color="k", lw=0.8)
            ax.set_yticks(ticks, labels, fontsize=7)
            what = "accuracy / exact match" if quantity == "metric" else "loss"
            better = "right" if quantity == "metric" else "left"
            ax.set(title=f"{BUDGETS[stage]}: {what} minus LoRA's", xlabel=f"difference ± 2 se ({better} is better)")
            ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stage", choices=STAGES)
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--out", default="runs/quality")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--methods", help="comma-separated: run only these methods of the stage (a later call without "
                   "--methods runs the rest; the summary holds the methods of the last call)")
    p.add_argument("--summary", action="store_true", help="print the tables of every finished stage")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    unknown = [t for t in args.tasks.split(",") if t not in TASKS]
    if unknown:
        p.error(f"unknown task(s) {unknown}; choose from {', '.join(TASKS)}")
    only = args.methods.split(",") if args.methods else None
    if only and args.stage and not set(only) <= set(STAGES[args.stage][2]):
        p.error(f"--methods: the {args.stage} stage has {', '.join(STAGES[args.stage][2])}")
    if args.summary:
        done = [(stage, task) for stage in STAGES for task in TASKS if (RESULTS / f"{stage}-{task}.json").exists()]
        print("\n".join(verdict_tables() + lever_verdicts() + [line for stage, task in done for line in (
            lever_table(task) if stage == "levers" else summary_table(f"{stage}-{task}"))]))
        if any(stage != "levers" for stage, _ in done):
            plot_differences(RESULTS / "summary.png")
        return
    if not args.stage:
        p.error("give --stage or --summary")
    for task in args.tasks.split(","):
        run_stage(args.stage, task, Path(args.out), only)


if __name__ == "__main__":
    main()
