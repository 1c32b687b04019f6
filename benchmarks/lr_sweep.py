"""LoRA-One under the learning-rate protocol (issue 22): every method at every rate of a log grid, 3 seeds, so that
each is compared at its own best rate (Lee et al., "Learning Rate Matters", arXiv 2602.04998: LoRA inits within
1-2% of LoRA at each one's best rate; PiSSA and LoRA-GA start sharper and want lower rates).

Tasks: SmolLM2-135M-Instruct, generative, the quality benchmark's settings (benchmarks/quality.py: rank 8, alpha 16
rsLoRA, gamma 128, all linear layers, batches of 4, 8 init samples, a constant rate after 4 warm-up steps):
- `trec`: the TREC question type as one label word (embedded `trec`, 6 words; closed-label accuracy: each candidate
  word scored by its log-likelihood, as `lora-one demo` scores it);
- `sentiment`: a Rotten Tomatoes snippet's sentiment as the word positive or negative (the embedded `sentiment`
  records, which are text-label, rewritten here as prompt-response records: see SENTIMENT_PROMPT; closed-label
  accuracy);
- `unicode`: a character's Unicode name (exact match of greedy generations, at most 16 new tokens);
- `dialog`: the reply to a line of a film (exact match, near zero at these budgets: its loss is what tells).

Every run trains once and is evaluated on fixed random samples (the same for every run) of the test split at steps
0, half the budget and the budget, and of the validation split at steps 0 and the budget (what chooses each
method's rate; nothing is chosen mid-run). The step-0 evaluations are shared by the runs of one init (task,
variant, seed), whatever their rate. A method's best rate is the one with the best mean over the seeds on
validation (the metric, ties to the lower loss; the loss alone on the exact-match tasks, as quality.py selects). Run folders (`--runs`) are ordinary `lora-one finetune` runs plus
`sweep.json`, the mark of a finished run: a later call reads it back (same settings) instead of running again, so
stages can run separately (`--tasks`, `--methods`, `--seeds`, `--lrs`). The adapters are deleted once a run is
done (`--keep-adapters` keeps them: 20 MB a run).

Outputs in `--out` (default benchmarks/results/quality/):
- `lr-sweep.json`: a list of records {task, method, lr, seed, step, split, loss, accuracy | exact_match, budget};
- `lr-sweep-seconds.json`: each run's wall time, init, training and evaluation seconds;
- `--report`: `lr-sweep.md` and `lr-sweep-<task>.png`: per task, each method's test metric and loss against the rate
  (mean ± se over seeds); LoRA-One minus LoRA at each one's own best rate (chosen on validation, paired by seed) and
  at each rate; each method's window of rates within one se of its best; the numbers at 2e-5. Nothing is chosen on
  the test split.
- `--curvature`: `curvature.json`, the step-0 top Hessian eigenvalue (recipes/curvature.py) of each method's adapter
  on its init samples, per task and seed.

    python benchmarks/lr_sweep.py --tasks trec --methods lora,lora-one --seeds 0,1,2 [--threads 2]
    python benchmarks/lr_sweep.py --report
    python benchmarks/lr_sweep.py --curvature --tasks trec,sentiment
    # smoke test: every code path, a few CPU minutes
    python benchmarks/lr_sweep.py --out /tmp/lr-smoke --tasks trec --lrs 2e-5,2e-3 --seeds 0 --max-steps 4 \\
        --eval-samples 16 && python benchmarks/lr_sweep.py --out /tmp/lr-smoke --report
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import random
import shutil
import statistics
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer, TrainerCallback

from lora_one.core.errors import UsageError
from lora_one.core.files import write_text_atomic
from lora_one.core.init import get_lora_one_model
from lora_one.recipes import embedded_data
from lora_one.recipes.curvature import top_hessian_eigenvalue
from lora_one.recipes.data import init_batches, read_records
from lora_one.recipes.evaluate import choices_of, make_evaluator
from lora_one.recipes.finetune import run_finetune
from lora_one.recipes.models import CAUSAL_LM, resolve_model_path
from lora_one.recipes.runs import complete_model_settings, load_task_data, lora_config_of
from lora_one.recipes.settings import FinetuneSettings, as_dict

RESULTS = Path(__file__).parent / "results" / "quality"
MODEL = "smollm2-135m"
# benchmarks/quality.py's COMMON and SMOLLM (warm-up set per budget below)
COMMON = dict(model=MODEL, rank=8, alpha=16.0, gamma=128.0, schedule="constant_with_warmup", max_length=128,
              batch_size=4, init_samples=8, eval_batch_size=16, max_new_tokens=16)
# A log grid, 1-2-5 in each decade (steps of 2 to 2.5x), from 1e-5 to 4e-3: 2e-5 is the rate of the LoRA-One and
# PiSSA papers' runs; 5e-4 the quality benchmark's fixed rate; 1e-3 and 2e-3 what its tuned stage chose (2.5e-4 ...
# 4e-3); 4e-3 its top, where the short runs begin to diverge. Nine rates resolve a window's width to 0.3-0.4 decades.
LRS = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 4e-3)
AT = 2e-5  # the papers' rate, reported on its own
METHODS = {  # as recipes/compare.py's METHODS name them
    "lora": {"variant": "lora"},
    "lora-one": {"variant": "lora-one"},
    "lora-one+precond": {"variant": "lora-one", "precondition": True},
}
DEFAULT_METHODS = ("lora", "lora-one")
SEEDS = (0, 1, 2)
# 80 steps of 4 examples, evaluated at 0, 40 and 80: under the constant schedule the first 40 steps are the quality
# benchmark's short budget, the last 40 double it.
BUDGET = 80
SAMPLE_SEED = 0  # the evaluation samples: one per task and split, whatever the run
SENTIMENT_PROMPT = ("Classify the sentiment of the film review snippet as positive or negative.\n"
                    "Snippet: {text}\nSentiment:")


@dataclass
class Task:
    what: str
    data: str  # an embedded data set's name
    metric: str  # accuracy (closed label set) or exact_match (greedy generation)
    select_by: str  # what chooses a method's best rate on validation: metric, or loss (exact match near zero)
    val_n: int  # evaluation sample sizes (the loss on all of them; exact match on generate_samples of them)
    test_n: int
    generate_samples: int = 0
    words: bool = False  # text-label records rewritten as prompt-response (SENTIMENT_PROMPT)


TASKS = {
    "trec": Task("TREC question type as one word (6 labels)", "trec", "accuracy", "metric", 300, 300),
    "sentiment": Task("Rotten Tomatoes snippet sentiment as positive / negative", "sentiment", "accuracy", "metric",
                      300, 300, words=True),
    "unicode": Task("a character's Unicode name", "unicode", "exact_match", "loss", 100, 100, generate_samples=64),
    "dialog": Task("the reply to a line of a film", "dialog", "exact_match", "loss", 200, 200, generate_samples=32),
}
# settings that act only after step 0: runs that agree on the others share the step-0 evaluation
AFTER_STEP0 = ("lr", "precondition", "prec_reg", "max_steps", "eval_every", "warmup_steps", "warmup_ratio",
               "schedule", "out", "overwrite", "quiet", "save_every")
RUN_FREE = ("out", "overwrite", "quiet", "device", "eval_batch_size")  # may differ between a run and its reuse
BIG_FILES = ("adapter_model.safetensors", "lora_one_step0.safetensors")


# ---------------------------------------------------------------- data


def _records(task: Task, split: str) -> list[dict]:
    records = embedded_data.load(f"{task.data}:{split}")
    if task.words:
        return [{"prompt": SENTIMENT_PROMPT.format(text=r["text"]), "response": " " + r["label"]} for r in records]
    return records


def _write_records(path: Path, records: list[dict]) -> str:
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    if not path.exists() or path.read_text(encoding="utf-8") != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, text)
    return str(path)


def sources(name: str, runs: Path, sizes: tuple[int | None, int | None] = (None, None)) -> dict[str, str]:
    """`{train, val, test}` data of a task: the embedded training split (rewritten into a file for label words), and a
    fixed random sample of the validation and test splits, named by their content (another sample, another file)."""
    task = TASKS[name]
    out = {"train": task.data if not task.words else
           _write_records(runs / "data" / f"{name}-train.jsonl", _records(task, "train"))}
    for split, n in (("val", sizes[0] or task.val_n), ("test", sizes[1] or task.test_n)):
        records = _records(task, split)
        if n < len(records):
            records = [records[i] for i in sorted(random.Random(SAMPLE_SEED).sample(range(len(records)), n))]
        digest = hashlib.sha256(json.dumps(records).encode()).hexdigest()[:12]
        out[split] = _write_records(runs / "data" / f"{name}-{split}-{len(records)}-{digest}.jsonl", records)
    return out


# ---------------------------------------------------------------- runs


def settings_of(name: str, method: str, lr: float, seed: int, steps: int, folder: Path, data: dict[str, str]
                ) -> FinetuneSettings:
    task = TASKS[name]
    return FinetuneSettings(
        **COMMON, **METHODS[method], data=data["train"], eval_data=data["test"], lr=lr, seed=seed, max_steps=steps,
        eval_every=max(1, steps // 2), warmup_steps=4 if steps > 8 else 1, generate_samples=task.generate_samples,
        save_every=0, out=str(folder), overwrite=True, quiet=True)


def _comparable(s: dict, free=RUN_FREE) -> dict:
    return {k: v for k, v in json.loads(json.dumps(s)).items() if k not in free}


class SecondSplit(TrainerCallback):
    """Evaluates the validation split at step 0 and at the end of the run, when the run evaluates its test split
    (`run_finetune`'s evaluation calls `on_evaluate` once per evaluation), with the evaluator `run_finetune` builds;
    `step0` supplies a known step-0 result (the same init). Mid-run, only the test split is evaluated: nothing is
    chosen there."""

    def __init__(self, evaluator, step0: dict | None = None):
        self.evaluator, self.step0 = evaluator, step0
        self.results: list[dict] = []
        self.seconds = 0.0

    def on_evaluate(self, args, state, control, model=None, metrics=None, **kwargs):
        step = state.global_step
        if step == 0 and self.step0 is not None:
            result = self.step0
        elif step in (0, state.max_steps):
            t = time.perf_counter()
            was_training = model.training
            model.eval()
            with torch.no_grad():
                result = self.evaluator(model)
            model.train(was_training)
            self.seconds += time.perf_counter() - t
        else:
            return
        self.results.append({"step": step, **result})


class Sweep:
    def __init__(self, out: Path, runs: Path, steps: int, overwrite: bool, keep: bool, sizes=(None, None)):
        self.out, self.runs, self.steps, self.sizes = out, runs, steps, sizes
        self.overwrite, self.keep = overwrite, keep
        self.tokenizer = None
        self.data: dict[str, dict] = {}

    def _tokenizer(self):
        if self.tokenizer is None:  # as recipes.models.load_model loads it
            self.tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(MODEL))
            if self.tokenizer.pad_token is None:
                self.tokenizer.pad_token = self.tokenizer.eos_token
        return self.tokenizer

    def _evaluator(self, s: FinetuneSettings, source: str):
        """The evaluator `run_finetune` would build for `source` with the settings `s` (completed)."""
        fields = s.fields
        choices = choices_of(read_records(s.data, CAUSAL_LM, fields), CAUSAL_LM, fields, s.choices)
        return make_evaluator(CAUSAL_LM, read_records(source, CAUSAL_LM, fields), self._tokenizer(), fields,
                              s.max_length, s.chat_template, choices, None, s.eval_batch_size, progress=False,
                              too_long=s.too_long, max_generate=s.generate_samples, max_new_tokens=s.max_new_tokens)

    def run(self, name: str, method: str, lr: float, seed: int) -> tuple[list[dict], dict]:
        """The records of one run (`(records, seconds)`), run now or read back from its finished folder."""
        data = self.data.setdefault(name, sources(name, self.runs, self.sizes))
        folder = self.runs / name / f"steps-{self.steps}" / method / f"lr-{lr:g}" / f"seed-{seed}"
        s = settings_of(name, method, lr, seed, self.steps, folder, data)
        complete_model_settings(s)  # the device and max length, as the run records them
        mark = folder / "sweep.json"
        if mark.is_file():
            done = json.loads(mark.read_text())
            saved, now = _comparable(done["settings"]), _comparable(as_dict(s))
            if saved == now:
                return done["records"], done["seconds"]
            if not self.overwrite:
                differ = sorted(k for k in now.keys() | saved.keys() if saved.get(k) != now.get(k))
                raise UsageError(f"{folder} holds a finished run with other settings ({', '.join(differ)}); give "
                                 "other --runs, or --overwrite to run it again.")
            mark.unlink()
        step0_file = self.runs / name / "step0" / f"{s.variant}-seed-{seed}.json"
        step0_key = _comparable(as_dict(s), RUN_FREE + AFTER_STEP0)
        step0 = json.loads(step0_file.read_text()) if step0_file.is_file() else None
        if step0 is not None and step0["settings"] != step0_key:
            step0 = None
        val = SecondSplit(self._evaluator(s, data["val"]), step0["val"] if step0 else None)
        t0 = time.perf_counter()
        summary = run_finetune(s, step0_eval=step0["test"] if step0 else None, callbacks=(val,))
        wall = time.perf_counter() - t0
        test = [{"step": m["step"], **{k.removeprefix("eval_"): v for k, v in m.items() if k.startswith("eval_")}}
                for m in summary["metrics"] if "eval_loss" in m]
        if step0 is None:
            first = {"val": val.results[0], "test": test[0]}
            if first["val"]["step"] == 0 and first["test"]["step"] == 0:
                step0_file.parent.mkdir(parents=True, exist_ok=True)
                write_text_atomic(step0_file, json.dumps({"settings": step0_key, **{
                    k: {m: x for m, x in v.items() if m != "step"} for k, v in first.items()}}, indent=1) + "\n")
        metric = TASKS[name].metric
        records = [{"task": name, "method": method, "lr": lr, "seed": seed, "step": e["step"], "split": split,
                    "loss": e["loss"], metric: e.get(metric), "budget": self.steps}
                   for split, evals in (("val", val.results), ("test", test)) for e in evals]
        seconds = {"wall": round(wall, 1), "init": summary["init_seconds"], "train": summary["train_seconds"],
                   "eval_test": summary["eval_seconds"], "eval_val": round(val.seconds, 1)}
        write_text_atomic(mark, json.dumps({"settings": as_dict(s), "records": records, "seconds": seconds},
                                           indent=1) + "\n")
        if not self.keep:
            for big in BIG_FILES:
                (folder / big).unlink(missing_ok=True)
        return records, seconds


def _key(r: dict) -> tuple:
    return r["task"], r.get("budget"), r["method"], r["lr"], r["seed"], r["step"], r["split"]


def merge_json(path: Path, new: list[dict], key) -> list[dict]:
    """`path`'s list of records with `new` in place of those of the same key; written atomically, sorted."""
    old = json.loads(path.read_text()) if path.is_file() else []
    merged = {key(r): r for r in old}
    merged.update({key(r): r for r in new})
    records = sorted(merged.values(), key=lambda r: tuple(str(x) if isinstance(x, str) else x for x in key(r)))
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(records, indent=1) + "\n")
    return records


def run_sweep(args) -> None:
    sweep = Sweep(args.out, args.runs, args.max_steps, args.overwrite, args.keep_adapters, args.eval_samples)
    plan = [(t, m, lr, seed) for t in args.tasks for m in args.methods for seed in args.seeds for lr in args.lrs]
    seconds_file = args.out / "lr-sweep-seconds.json"
    for i, (name, method, lr, seed) in enumerate(plan, 1):
        t = time.perf_counter()
        records, seconds = sweep.run(name, method, lr, seed)
        merge_json(args.out / "lr-sweep.json", records, _key)
        merge_json(seconds_file, [{"task": name, "budget": args.max_steps, "method": method, "lr": lr, "seed": seed,
                                   "step": None, "split": None, **seconds}], _key)
        end = {r["split"]: r for r in records if r["step"] == args.max_steps}
        metric = TASKS[name].metric
        print(f"[{i}/{len(plan)}] {name} {method} lr={lr:g} seed={seed}: "
              + ", ".join(f"{split} loss {r['loss']:.4f} {metric} {r[metric]:.3f}" for split, r in end.items())
              + f" ({seconds['wall']:.0f} s; {time.perf_counter() - t:.0f} s now)", flush=True)


# ---------------------------------------------------------------- curvature


def step0_model(s: FinetuneSettings, model, task: str, batches: list[dict]):
    """The run's step-0 adapter on `batches` (exactly its init samples), as `finetune` builds it."""
    return get_lora_one_model(model, lora_config_of(s, task), batches, config=s.lora_one_config(),
                              show_progress_bar=False)


def run_curvature(args) -> None:
    """The step-0 top Hessian eigenvalue of each method's adapter on its own init samples (as finetune draws them):
    lora (B = 0, A random) and lora-one (the one-step gradient's top subspace); the preconditioner acts after
    step 0 and shares lora-one's init."""
    records = []
    for name in args.tasks:
        data = sources(name, args.runs, args.eval_samples)
        for method in dict.fromkeys("lora-one" if m == "lora-one+precond" else m for m in args.methods):
            for seed in args.seeds:
                s = settings_of(name, method, 1e-4, seed, args.max_steps, args.runs / "curvature", data)
                complete_model_settings(s)
                torch.manual_seed(seed)
                model, tokenizer, task, _, feats, _ = load_task_data(s, s.data)
                model.to(s.device)
                batches = init_batches(feats, s.init_samples, s.init_samples, seed, tokenizer.pad_token_id)
                peft_model = step0_model(s, model, task, batches)
                c = top_hessian_eigenvalue(peft_model, batches, tol=args.curv_tol, max_iter=args.curv_iters, seed=seed)
                record = {"task": name, "method": method, "seed": seed, **c.as_dict(), "tol": args.curv_tol,
                          "max_iter": args.curv_iters, "init_samples": s.init_samples}
                records.append(record)
                print(f"{name} {method} seed {seed}: top eigenvalue {c.eigenvalue:.4g} (residual {c.residual:.2g}, "
                      f"{c.iterations} products, {'converged' if c.converged else 'NOT converged'}, "
                      f"{c.parameters:,} parameters, {c.seconds:.0f} s)", flush=True)
                merge_json(args.out / "curvature.json", records, lambda r: (r["task"], r["method"], r["seed"]))
                del peft_model, model


# ---------------------------------------------------------------- report


def mean_se(values: list[float]) -> tuple[float, float | None]:
    n = len(values)
    if n == 0:
        return math.nan, None
    return math.fsum(values) / n, (statistics.stdev(values) / math.sqrt(n) if n > 1 else None)


def _fmt(mean: float, se: float | None, digits: int) -> str:
    if mean is None or not math.isfinite(mean):
        return "diverged" if mean is not None else "-"
    return f"{mean:.{digits}f}" + (f" ± {se:.{digits}f}" if se is not None else "")


def _diff(m: float, se: float | None, digits: int, higher_better: bool) -> str:
    if not math.isfinite(m):
        return "-"
    if se is None:
        return f"{m:+.{digits}f} (one seed)"
    verdict = "tie" if abs(m) <= 2 * se else ("win" if (m > 0) == higher_better else "loss")
    return f"{m:+.{digits}f}" + (f" ± {se:.{digits}f}" if se is not None else "") + f" {verdict}"


class TaskData:
    """One task's records at one budget: `value(split, method, lr, step, key) -> {seed: value}`."""

    def __init__(self, name: str, budget: int, records: list[dict]):
        self.name, self.budget, self.task = name, budget, TASKS[name]
        self.metric = self.task.metric
        self.table = defaultdict(dict)
        for r in records:
            for key in ("loss", self.metric):
                self.table[(r["split"], r["method"], r["lr"], r["step"], key)][r["seed"]] = r.get(key)
        self.methods = [m for m in METHODS if any(r["method"] == m for r in records)]
        self.lrs = sorted({r["lr"] for r in records})
        self.mid = max(1, budget // 2)

    def value(self, split, method, lr, step, key) -> dict[int, float]:
        return {s: (v if v is not None else math.nan) for s, v in self.table.get((split, method, lr, step, key),
                                                                                 {}).items()}

    def summary(self, split, method, lr, step, key) -> tuple[float, float | None]:
        values = list(self.value(split, method, lr, step, key).values())
        if any(not math.isfinite(v) for v in values):  # a diverged seed: the rate is no candidate
            return math.nan, None
        return mean_se(values)

    def score(self, method, lr) -> tuple:
        """The validation score that chooses the best rate (higher is better): the metric, ties to the lower loss;
        or the loss alone (`select_by` loss). A rate with a diverged seed scores lowest."""
        loss, _ = self.summary("val", method, lr, self.budget, "loss")
        if not math.isfinite(loss):
            return (-math.inf,)
        if self.task.select_by == "loss":
            return (-loss,)
        metric, _ = self.summary("val", method, lr, self.budget, self.metric)
        return (metric, -loss)

    def best(self, method) -> float | None:
        rates = [lr for lr in self.lrs if self.value("val", method, lr, self.budget, "loss")]
        return max(rates, key=lambda lr: self.score(method, lr)) if rates else None

    def window(self, method, split) -> tuple[list[float], float | None]:
        """The rates whose mean (by what chooses: metric or loss) is within one se of the best rate's mean on
        `split`, the best being the one chosen on validation for both splits; and their span in decades."""
        key = self.metric if self.task.select_by == "metric" else "loss"
        sign = 1 if key == self.metric else -1
        best = self.best(method)
        if best is None:
            return [], None
        top, se = self.summary(split, method, best, self.budget, key)
        if not math.isfinite(top):
            return [], None
        inside = []
        for lr in self.lrs:
            m, _ = self.summary(split, method, lr, self.budget, key)
            if math.isfinite(m) and sign * (top - m) <= (se or 0.0):
                inside.append(lr)
        return inside, math.log10(max(inside) / min(inside)) if inside else None

    def paired(self, split, a: tuple[str, float], b: tuple[str, float], step, key) -> tuple[float, float | None]:
        va, vb = self.value(split, a[0], a[1], step, key), self.value(split, b[0], b[1], step, key)
        seeds = sorted(set(va) & set(vb))
        return mean_se([va[s] - vb[s] for s in seeds]) if seeds else (math.nan, None)


def _edge(rates: list[float], lrs: list[float]) -> str:
    if len(lrs) < 2:
        return ""
    notes = [w for w, lr in (("lowest", lrs[0]), ("highest", lrs[-1])) if lr in rates]
    return f" (includes the {' and '.join(notes)} rate of the grid)" if notes else ""


def task_report(d: TaskData, png: str) -> list[str]:
    metric, budget, mid = d.metric, d.budget, d.mid
    seeds = sorted({s for v in d.table.values() for s in v})
    chooser = (f"validation {metric.replace('_', ' ')} (ties: lower loss)" if d.task.select_by == "metric" else
               "validation loss (exact match of a few greedy answers cannot tell rates apart)")
    lines = [f"## {d.name}: {d.task.what}", "",
             f"{budget} steps (mid-run: step {mid}), seeds {', '.join(map(str, seeds))}, test split unless said; "
             f"mean ± se over seeds. Best rate of each method chosen on the validation split at step {budget} by "
             f"{chooser}, the mean over the seeds at each rate; differences paired by seed; win or loss: beyond 2 se.",
             "",
             f"![{d.name}: test {metric} and loss against the learning rate]({png})", ""]
    # each method at its own best rate
    best = {m: d.best(m) for m in d.methods}
    lines += ["### Each method at its own best rate", "",
              f"| method | chosen lr | val {metric} | test {metric} (step {budget}) | test loss | test {metric} "
              f"(step {mid}) | test loss (step {mid}) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for m in d.methods:
        lr = best[m]
        if lr is None:
            continue
        cells = [m, f"{lr:g}", _fmt(*d.summary("val", m, lr, budget, metric), 3),
                 _fmt(*d.summary("test", m, lr, budget, metric), 3), _fmt(*d.summary("test", m, lr, budget, "loss"), 4),
                 _fmt(*d.summary("test", m, lr, mid, metric), 3), _fmt(*d.summary("test", m, lr, mid, "loss"), 4)]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    if "lora" in d.methods and best.get("lora") is not None:
        lines += [f"LoRA-One minus LoRA, each at its own best rate (paired by seed):", "",
                  f"| method | step | {metric} | loss |", "|---|---:|---:|---:|"]
        for m in d.methods:
            if m == "lora" or best[m] is None:
                continue
            for step in (budget, mid):
                a, b = (m, best[m]), ("lora", best["lora"])
                lines.append(f"| {m} ({best[m]:g}) - lora ({best['lora']:g}) | {step} | "
                             f"{_diff(*d.paired('test', a, b, step, metric), 3, True)} | "
                             f"{_diff(*d.paired('test', a, b, step, 'loss'), 4, False)} |")
        lines.append("")
    # the window
    lines += ["### The window of good rates", "",
              f"Rates whose mean {'(' + metric.replace('_', ' ') + ')' if d.task.select_by == 'metric' else 'loss'} "
              f"at step {budget} is within one se of the best rate's (the rate chosen on validation), and their span "
              "in decades (log10 of the highest over the lowest). Validation: the protocol's; test: descriptive.", "",
              "| method | validation window | span | test window | span |", "|---|---|---:|---|---:|"]
    for m in d.methods:
        cells = [m]
        for split in ("val", "test"):
            rates, span = d.window(m, split)
            cells += [", ".join(f"{r:g}" for r in rates) + _edge(rates, d.lrs), "-" if span is None else f"{span:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    # every rate
    head = " | ".join(f"{m} {metric}" for m in d.methods) + " | " + " | ".join(f"{m} loss" for m in d.methods)
    others = [m for m in d.methods if m != "lora"] if "lora" in d.methods else []
    diffs = " | ".join(f"{m} - lora {metric} | {m} - lora loss" for m in others)
    lines += [f"### Every rate (test split, step {budget})", "",
              f"| lr | {head}" + (f" | {diffs}" if diffs else "") + " |",
              "|---:|" + "---:|" * (2 * len(d.methods) + 2 * len(others))]
    for lr in d.lrs:
        cells = [f"{lr:g}" + (" (the papers')" if math.isclose(lr, AT) else "")]
        cells += [_fmt(*d.summary("test", m, lr, budget, metric), 3) for m in d.methods]
        cells += [_fmt(*d.summary("test", m, lr, budget, "loss"), 4) for m in d.methods]
        for m in others:
            cells += [_diff(*d.paired("test", (m, lr), ("lora", lr), budget, metric), 3, True),
                      _diff(*d.paired("test", (m, lr), ("lora", lr), budget, "loss"), 4, False)]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    at = [lr for lr in d.lrs if math.isclose(lr, AT)]
    if at:
        lr = at[0]
        lines += [f"### At {AT:g}", ""]
        for step in (budget, mid):
            parts = [f"{m} {metric} {_fmt(*d.summary('test', m, lr, step, metric), 3)}, loss "
                     f"{_fmt(*d.summary('test', m, lr, step, 'loss'), 4)}" for m in d.methods]
            parts += [f"{m} - lora: {metric} {_diff(*d.paired('test', (m, lr), ('lora', lr), step, metric), 3, True)}"
                      f", loss {_diff(*d.paired('test', (m, lr), ('lora', lr), step, 'loss'), 4, False)}"
                      for m in others]
            lines.append(f"- step {step}: " + "; ".join(parts) + ".")
        lines.append("")
    else:
        lines += [f"({AT:g} is not in this sweep's grid.)", ""]
    return lines


def plot_task(d: TaskData, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 5))
    for ax, key in zip(axes, (d.metric, "loss")):
        for i, m in enumerate(d.methods):
            for step, style, alpha in ((d.budget, "o-", 1.0), (d.mid, "s--", 0.45)):
                pts = [(lr, *d.summary("test", m, lr, step, key)) for lr in d.lrs]
                pts = [(lr, mu, se or 0.0) for lr, mu, se in pts if math.isfinite(mu)]
                if not pts:
                    continue
                x, y, e = zip(*pts)
                ax.errorbar(x, y, yerr=e, fmt=style, color=f"C{i}", alpha=alpha, capsize=3, ms=4,
                            label=f"{m}, step {step}")
            step0 = [v for lr in d.lrs for v in [d.summary("test", m, lr, 0, key)[0]] if math.isfinite(v)]
            if step0:  # the init's, whatever the rate
                ax.axhline(step0[0], color=f"C{i}", lw=0.8, ls=":", alpha=0.7, label=f"{m}, step 0")
            best = d.best(m)
            if best is not None:
                mu, _ = d.summary("test", m, best, d.budget, key)
                if math.isfinite(mu):
                    ax.plot([best], [mu], "*", color=f"C{i}", ms=14, mec="k",
                            label=f"{m}: chosen on validation ({best:g})")
        ax.axvline(AT, color="grey", lw=0.8, ls="-.", label=f"{AT:g}, the papers' rate")
        ax.set_xscale("log")
        if key == "loss":
            ax.set_yscale("log")
        ax.set(xlabel="learning rate", ylabel=f"test {key.replace('_', ' ')}",
               title=f"{d.name}: test {key.replace('_', ' ')} (mean ± se over seeds)")
        ax.grid(alpha=0.3, which="both")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=4, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.14, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def curvature_lines(path: Path) -> list[str]:
    if not path.is_file():
        return []
    records = json.loads(path.read_text())
    lines = ["## Step-0 curvature", "",
             "The top eigenvalue (largest in magnitude, signed) of the Hessian of the loss on the init samples with "
             "respect to the adapter's parameters, at step 0 (`recipes/curvature.py`: power iteration until "
             "|Hv - λv| <= tol |λ|; an eigenvalue lies within the residual of λ; |Hv| is a lower bound of the "
             "largest |eigenvalue|, which it converges to even where λ does not).", "",
             "| task | method | seed | eigenvalue λ | residual | abs(Hv) | products | converged | seconds |",
             "|---|---|---:|---:|---:|---:|---:|---|---:|"]
    for r in records:
        lines.append(f"| {r['task']} | {r['method']} | {r['seed']} | {r['eigenvalue']:.4g} | {r['residual']:.2g} | "
                     f"{r.get('norm', math.nan):.4g} | {r['iterations']} | {'yes' if r['converged'] else 'no'} | "
                     f"{r['seconds']:.0f} |")
    return lines + [""]


def report(out: Path, tasks: list[str], budget: int | None) -> Path:
    path = out / "lr-sweep.json"
    if not path.is_file():
        raise UsageError(f"{path} does not exist: run the sweep first.")
    records = json.loads(path.read_text())
    lines = ["# LoRA-One under the learning-rate protocol", "",
             f"Read from `{path.name}` by `benchmarks/lr_sweep.py --report`. Model {MODEL}; every run as in "
             "benchmarks/quality.py (rank 8, alpha 16 rsLoRA, gamma 128, all linear layers, batches of 4, 8 init "
             "samples, a constant rate after the warm-up), evaluated on fixed samples of the validation and test "
             "splits. Nothing is chosen on the test split.", ""]
    seconds_file = out / "lr-sweep-seconds.json"
    for name in tasks:
        rows = [r for r in records if r["task"] == name]
        budgets = sorted({r.get("budget") or max(x["step"] for x in rows) for r in rows})
        if not rows:
            continue
        b = budget if budget in budgets else budgets[-1]
        d = TaskData(name, b, [r for r in rows if (r.get("budget") or b) == b])
        png = f"lr-sweep-{name}.png"
        plot_task(d, out / png)
        lines += task_report(d, png)
        if seconds_file.is_file():
            secs = [r for r in json.loads(seconds_file.read_text()) if r["task"] == name and r["budget"] == b]
            if secs:
                walls = [r["wall"] for r in secs]
                lines += [f"Time: {len(walls)} runs, {sum(walls):.0f} s in all, {statistics.mean(walls):.0f} s a run "
                          f"(init {statistics.mean(r['init'] for r in secs):.0f} s, training "
                          f"{statistics.mean(r['train'] for r in secs):.0f} s, evaluation "
                          f"{statistics.mean(r['eval_val'] + r['eval_test'] for r in secs):.0f} s).", ""]
    lines += curvature_lines(out / "curvature.json")
    md = out / "lr-sweep.md"
    write_text_atomic(md, "\n".join(lines))
    return md


# ---------------------------------------------------------------- the command


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=f"of {', '.join(METHODS)}")
    p.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    p.add_argument("--lrs", default=",".join(f"{x:g}" for x in LRS))
    p.add_argument("--max-steps", type=int, default=BUDGET, help="the budget; evaluations at 0, half and all of it")
    p.add_argument("--out", type=Path, default=RESULTS, help="lr-sweep.json, the report, curvature.json")
    p.add_argument("--runs", type=Path, help="run folders (default: runs/lr-sweep, or OUT/runs with --out)")
    p.add_argument("--eval-samples", help="VAL,TEST: sample sizes of the held-out splits instead of each task's")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--overwrite", action="store_true", help="run again the finished runs made with other settings")
    p.add_argument("--keep-adapters", action="store_true", help="keep each run's adapter files")
    p.add_argument("--report", action="store_true", help="write lr-sweep.md and the plots from lr-sweep.json")
    p.add_argument("--curvature", action="store_true", help="write curvature.json: the step-0 top Hessian eigenvalue")
    p.add_argument("--curv-tol", type=float, default=1e-2, help="power iteration: stop at |Hv - λv| <= tol |λ|")
    p.add_argument("--curv-iters", type=int, default=100, help="power iteration: at most this many products")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.tasks = args.tasks.split(",")
    args.methods = args.methods.split(",")
    for kind, given, known in (("task", args.tasks, TASKS), ("method", args.methods, METHODS)):
        unknown = [x for x in given if x not in known]
        if unknown:
            p.error(f"unknown {kind}(s) {unknown}; choose from {', '.join(known)}")
    args.seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    args.lrs = sorted(_floats(args.lrs))
    if args.max_steps < 2:
        p.error("--max-steps must be >= 2 (evaluations at half the budget and at its end)")
    sizes = [int(x) for x in args.eval_samples.split(",")] if args.eval_samples else [None, None]
    args.eval_samples = (sizes[0], sizes[-1])
    if args.runs is None:
        args.runs = Path("runs/lr-sweep") if args.out == RESULTS else args.out / "runs"
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        if args.report:
            print(f"wrote {report(args.out, args.tasks, args.max_steps)}")
        elif args.curvature:
            run_curvature(args)
        else:
            run_sweep(args)
    except UsageError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
