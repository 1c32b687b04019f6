"""`lora-one compare`: fine-tuning methods against each other on any model and data.

A method is a named set of finetune settings (`METHODS`), optionally changed (`name:key=value` on the
command line; a list of values is a grid). For each method the learning rate (from `--lr-grid` unless
the method names its own) and every setting given a grid are chosen on the validation split
(`--eval-data`) with the first seed; then every seed runs at the chosen setting, evaluated on the test
split (`--test-data`; without one, the validation split, which the report says). Every run is an
ordinary `finetune` run with the same data order (its seed), step budget and evaluation steps.

`--out` holds:
- `compare.json`: the plan (settings and methods); it marks the folder as a comparison's;
- `val/<method>/<setting>/seed-<s>/` and `test/...`: the run folders, evaluated on the validation or the
  test split. A finished run (adapter saved) made with the same settings is read back, not run again;
- `data/`: the fixed evaluation samples of `--eval-samples`;
- `report.md`, `comparison.png`, `summary.json`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import random
import re
import statistics
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from lora_one.core.errors import UsageError
from lora_one.core.constants import VARIANTS
from lora_one.core.files import ADAPTER, check_out_folder, check_writable, write_text_atomic
from lora_one.core.parallel import resolve_device
from lora_one.core.save import SIDECAR
from lora_one.recipes.constants import CLASSIFICATION, PROMPT_RESPONSE
from lora_one.recipes.data import load_records, read_records, resolve_format
from lora_one.recipes.evaluate import choices_of
from lora_one.recipes.finetune import ARGS, METRICS, RESUME_FREE, run_finetune
from lora_one.recipes.models import infer_task, resolve_model_path
from lora_one.recipes.plots import plot_comparison
from lora_one.recipes.settings import DataSettings, FinetuneSettings, as_dict, inert, required, setting

METHODS = {  # name -> the finetune settings that make the method
    **{variant: {"variant": variant} for variant in VARIANTS},
    "lora-one+precond": {"variant": "lora-one", "precondition": True},
    "dora": {"variant": "lora", "dora": True},
    "dora-one": {"variant": "lora-one", "dora": True},
}
DEFAULT_METHODS = ("lora", "lora-one", "lora-one+precond")
PLAN = "compare.json"
GENERATION_SAMPLES = 100  # default --eval-samples when the metric is exact match of greedy generations
SAMPLE_SEED = 0  # the evaluation sample is one for the whole comparison, whatever the run's seed
ROLES = {"val": "validation", "test": "test"}  # run folder -> the split its runs are evaluated on
# What every run of a comparison shares (data, budget, evaluation): no method may change it.
SHARED = {f.name for f in dataclasses.fields(DataSettings)} | {
    "seed", "out", "overwrite", "resume", "quiet", "max_steps", "epochs", "batch_size", "grad_accum", "eval_data",
    "eval_split", "eval_every", "eval_batch_size", "choices", "save_every", "push_to_hub", "hub_model_id"}
# Finetune settings that compare sets itself, and what to use instead of giving them.
CHOSEN = {
    "variant": "name methods in --methods",
    "precondition": "use the method lora-one+precond, or name:precondition=true in --methods",
    "dora": "use the methods dora and dora-one, or name:dora=true in --methods",
    "lr": "give --lr-grid, or name:lr=... in --methods",
    "eval_split": "give the validation split as --eval-data",
    "resume": "compare continues what --out holds by itself",
    "save_every": "an unfinished run starts again, so checkpoints would go unused",
    "push_to_hub": "push the chosen run's adapter with lora-one finetune",
    "hub_model_id": "push the chosen run's adapter with lora-one finetune",
}
# Settings that act only after step 0: runs that agree on all the others share the step-0 evaluation.
AFTER_STEP0 = ("lr", "precondition", "prec_reg", "lora_plus_ratio", "schedule", "warmup_steps", "warmup_ratio",
               "weight_decay", "batch_size", "grad_accum", "epochs", "max_steps", "max_grad_norm", "eval_every",
               "save_every", "gradient_checkpointing", "out", "overwrite", "resume", "quiet", "report_to",
               "push_to_hub", "hub_model_id", "base_model_name", "grad_cache")
_FINETUNE_DEFAULTS = {f.name: f.default for f in dataclasses.fields(FinetuneSettings)}


@dataclass(kw_only=True)
class CompareSettings(FinetuneSettings):
    """Comparison (`compare`: each method at its best validation setting, over seeds, on the test split)."""

    eval_data: str = required("validation data: chooses each method's learning rate (and any grid it names), "
                              "with the first seed")
    test_data: str | None = setting(None, "test data the results are reported on, never used to choose (default: "
                                    "none, the validation split is reported and the report says so)")
    lr_grid: str = setting("2e-4,5e-4,1e-3", "comma-separated learning rates each method chooses from")
    seeds: int = setting(3, "runs per method at its chosen setting, with seeds --seed, --seed + 1, ...")
    max_steps: int = setting(0, "optimizer steps of every run; overrides --epochs when > 0")
    eval_every: int = setting(0, "steps between evaluations (0: a quarter of --max-steps; by --epochs: step 0 and "
                              "the end only)")
    eval_samples: int | None = setting(None, "evaluate a fixed random sample of this many records of each held-out "
                                       f"split (default: all; {GENERATION_SAMPLES} when the responses are open, "
                                       "scored by exact match of greedy generations, which is slow)")
    select_by: str = setting("metric", "what chooses each method's setting on the validation split: metric (accuracy "
                             "or exact match, ties to the lower loss) or loss (when few greedy answers are exact, "
                             "exact match cannot tell the candidates apart)", ("metric", "loss"))
    overwrite: bool = setting(False, "run again the finished runs in --out made with other settings (default: "
                              "refuse), and write into an --out that holds other files")

    @property
    def learning_rates(self) -> list[float]:
        try:
            rates = [float(x) for x in self.lr_grid.split(",") if x.strip()]
        except ValueError:
            raise UsageError(f"--lr-grid {self.lr_grid!r}: give comma-separated numbers, e.g. "
                             "2e-4,5e-4,1e-3.") from None
        if not rates:
            raise UsageError(f"--lr-grid {self.lr_grid!r} names no learning rate; give e.g. 2e-4,5e-4,1e-3.")
        return list(dict.fromkeys(rates))  # a repeated value is one candidate

    def check(self) -> None:
        super().check()
        given = [name for name in CHOSEN if getattr(self, name) != _FINETUNE_DEFAULTS[name]]
        if given:
            raise UsageError(f"--{given[0].replace('_', '-')} is set by compare for each run: {CHOSEN[given[0]]}.")
        problems = []
        if self.seeds < 1:
            problems.append(f"--seeds must be >= 1, got {self.seeds}")
        if self.eval_samples is not None and self.eval_samples < 1:
            problems.append(f"--eval-samples must be >= 1, got {self.eval_samples}")
        if problems:
            raise UsageError("; ".join(problems) + ".")
        self.learning_rates  # noqa: B018 (refuses an empty or malformed grid now)


@dataclass
class Method:
    label: str
    base: str  # the name in METHODS
    fixed: dict  # the settings the method sets
    grid: dict  # setting -> its candidate values, "lr" first

    def candidates(self) -> list[dict]:
        return [dict(zip(self.grid, values)) for values in itertools.product(*self.grid.values())]


def plan_methods(methods: Mapping[str, Mapping | None], learning_rates: list[float]) -> list[Method]:
    """`label -> {setting: value or list of candidate values}` (the method is `"method"`, default the
    label) as Methods; a method without its own `lr` chooses from `learning_rates`."""
    if not methods:
        raise UsageError(f"--methods names no method; choose from {', '.join(METHODS)}.")
    tunable = set(_FINETUNE_DEFAULTS) - SHARED
    plan, folders = [], {}
    for label, spec in methods.items():
        spec = dict(spec or {})
        base = spec.pop("method", label)
        if base not in METHODS:
            raise UsageError(f"Unknown method {base!r} in --methods; choose from {', '.join(METHODS)} (changed with "
                             "name:key=value, e.g. lora-one:gamma=64).")
        for key in spec:
            if key not in tunable:
                why = "is the same for every method" if key in SHARED else "is not a finetune setting"
                raise UsageError(f"--methods {label!r}: {key!r} {why}; a method may set {', '.join(sorted(tunable))}.")
        fixed, grid = dict(METHODS[base]), {"lr": learning_rates}
        for key, value in spec.items():
            values = list(value) if isinstance(value, (list, tuple)) else [value]
            if not values:
                raise UsageError(f"--methods {label!r}: {key} has no value.")
            if key == "lr" or len(values) > 1:
                grid[key] = values
            else:
                fixed[key] = values[0]
        folder = _path_part(label)
        if folder in folders:
            raise UsageError(f"--methods names {folders[folder]!r} and {label!r}, which share the run folder "
                             f"{folder!r}; name them apart.")
        folders[folder] = label
        plan.append(Method(label, base, fixed, grid))
    return plan


def _text(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def setting_name(candidate: dict) -> str:
    return ",".join(f"{k}={_text(v)}" for k, v in candidate.items())


def _path_part(text: str) -> str:
    return re.sub(r"[^\w.+=,-]", "_", text)


def step0_key(s: FinetuneSettings) -> str:
    return json.dumps({k: v for k, v in as_dict(s).items() if k not in AFTER_STEP0}, sort_keys=True)


def read_run(folder: Path) -> dict:
    """A finished run's summary, as `run_finetune` returned it (the sidecar keeps all but the metrics)."""
    training = json.loads((folder / SIDECAR).read_text())["training"]
    with (folder / METRICS).open(encoding="utf-8") as f:
        metrics = [json.loads(line) for line in f if line.strip()]
    return {**training, "folder": str(folder), "metrics": metrics}


def _finished(folder: Path, s: FinetuneSettings, overwrite: bool) -> bool:
    """Whether `folder` holds a finished run of the settings `s` (one of other settings is refused,
    or run again under `overwrite`)."""
    if not all((folder / name).is_file() for name in (ADAPTER.marker, SIDECAR, ARGS, METRICS)):
        return False
    # through JSON, as args.json was written: a tuple (a gamma grid) is a list there
    saved, current = json.loads((folder / ARGS).read_text()), as_dict(s)
    free = {*RESUME_FREE, *inert(current), "out"}
    # None: a default the run filled in (the task, the max length); "out": the comparison may have moved
    differ = [(k, v) for k, v in current.items() if k not in free and v is not None and saved.get(k) != v]
    if not differ or overwrite:
        return not differ
    key, value = differ[0]
    raise UsageError(f"{folder} holds a finished run with other settings ({key} {saved.get(key)!r} there, {value!r} "
                     "now); give another --out, or --overwrite to run it again.")


def metric_of(entry: dict) -> str | None:
    """The task metric of an evaluation entry (None: loss only)."""
    return next((m for m in ("accuracy", "exact_match") if f"eval_{m}" in entry), None)


def diverged(run: dict) -> bool:
    """Whether a run's last evaluation is not finite: its loss went to inf or NaN."""
    end = run["final_eval"]
    metric = metric_of(end)
    return not all(math.isfinite(end[f"eval_{key}"]) for key in ("loss", *([metric] if metric else [])))


def _best(runs: list[dict], select_by: str = "metric") -> int | None:
    """Index of the run with the best last evaluation: the highest metric, ties to the lower loss (the
    lowest loss when there is no metric, or by `select_by="loss"`), then to the first. A run that
    diverged is never the best (None when all did): NaN compares false, so `max` could pick it."""
    def score(run):
        end = run["final_eval"]
        metric = metric_of(end) if select_by == "metric" else None
        return (end[f"eval_{metric}"], -end["eval_loss"]) if metric else (-end["eval_loss"],)
    scores = {i: score(r) for i, r in enumerate(runs) if not diverged(r)}
    return max(scores, key=scores.__getitem__) if scores else None


def grid_edges(grid: dict, chosen: dict) -> list[str]:
    """Each numeric grid whose choice is its smallest or largest value: the best may lie beyond it."""
    notes = []
    for key, values in grid.items():
        numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if len(set(numbers)) < 2 or len(numbers) < len(values) or chosen[key] not in (min(numbers), max(numbers)):
            continue
        edge = "largest" if chosen[key] == max(numbers) else "smallest"
        notes.append(f"{key}={_text(chosen[key])}, the {edge} of {', '.join(_text(v) for v in values)}")
    return notes


def mean_se(values: list[float]) -> dict:
    """Mean and standard error (sample standard deviation / sqrt(n); None for n = 1)."""
    n = len(values)
    return {"mean": math.fsum(values) / n, "se": statistics.stdev(values) / math.sqrt(n) if n > 1 else None, "n": n}


def values_by_step(runs: list[dict], key: str) -> list[dict]:
    """Per run, `step -> eval_<key>`."""
    return [{m["step"]: m[f"eval_{key}"] for m in r["metrics"] if "eval_loss" in m} for r in runs]


def curves(runs: list[dict], keys: list[str]) -> dict[str, list[dict]]:
    """`key -> [{"step", "mean", "se", "n"}]` over the runs at each evaluation step."""
    by_run = {key: values_by_step(runs, key) for key in keys}
    return {key: [{"step": step, **mean_se([run[step] for run in by_run[key]])} for step in sorted(by_run[key][0])]
            for key in keys}


def difference(a: list[dict], b: list[dict], key: str) -> list[dict]:
    """Runs `a` minus runs `b` in `key` at each evaluation step, paired by seed: the mean and standard
    error of the per-seed differences. The runs of a seed share the data order (and a classifier's
    random head), so a difference within a seed is free of the spread between seeds."""
    seeds_a, seeds_b = [r["seed"] for r in a], [r["seed"] for r in b]
    if sorted(seeds_a) != sorted(seeds_b):
        raise UsageError(f"Cannot pair runs of seeds {seeds_a} with runs of seeds {seeds_b}; compare the same seeds.")
    by_seed_b = dict(zip(seeds_b, values_by_step(b, key)))
    pairs = [(x, by_seed_b[seed]) for seed, x in zip(seeds_a, values_by_step(a, key))]
    steps = sorted(pairs[0][0])
    if any(sorted(x) != steps or sorted(y) != steps for x, y in pairs):
        raise UsageError("Cannot pair runs evaluated at different steps; compare runs of the same --eval-every.")
    return [{"step": step, "diff": (d := mean_se([x[step] - y[step] for x, y in pairs]))["mean"], "se": d["se"]}
            for step in steps]


def _scored_by_generation(s: CompareSettings) -> bool:
    """Whether evaluation generates (exact match): prompt/response records without a closed label set
    (the rule of `make_evaluator`; the label set comes from the training data, as in `finetune`)."""
    task = s.task or infer_task(resolve_model_path(s.model))
    if task == CLASSIFICATION or resolve_format(load_records(s.eval_data), task, s.fields).format != PROMPT_RESPONSE:
        return False
    return choices_of(read_records(s.data, task, s.fields), task, s.fields, s.choices) is None


def _sample(source: str, size: int, out: Path, role: str) -> tuple[dict, str | None]:
    """`({"data", "n", "of"}, text)`: `source` itself when it holds at most `size` records (text None),
    else a file under `out` to be written with `text`, a fixed random sample of `size` of the records
    (named by its content, so that runs evaluated on another sample are not taken for runs on this one)."""
    records = load_records(source)
    if len(records) <= size:
        return {"data": source, "n": len(records), "of": len(records)}, None
    keep = sorted(random.Random(SAMPLE_SEED).sample(range(len(records)), size))
    text = "".join(json.dumps(records[i], ensure_ascii=False, default=str) + "\n" for i in keep)
    path = out / "data" / f"{role}-{size}-{hashlib.sha256(text.encode()).hexdigest()[:12]}.jsonl"
    return {"data": str(path), "n": size, "of": len(records)}, text


class _Runs:
    """Runs a comparison's finetune runs, or reads finished ones back; shares step-0 evaluations; one
    progress line per run."""

    def __init__(self, s: CompareSettings, out: Path, splits: dict[str, str], eval_every: int, total: int):
        self.s, self.out, self.splits, self.eval_every, self.total = s, out, splits, eval_every, total
        self.done: dict[Path, dict] = {}
        self.step0: dict[str, dict] = {}

    def settings(self, method: Method, candidate: dict, seed: int, role: str) -> FinetuneSettings:
        base = {name: getattr(self.s, name) for name in _FINETUNE_DEFAULTS}
        folder = self.out / role / _path_part(method.label) / _path_part(setting_name(candidate)) / f"seed-{seed}"
        return FinetuneSettings(**{**base, **method.fixed, **candidate, "seed": seed, "out": str(folder),
                                   "eval_data": self.splits[role], "eval_every": self.eval_every, "save_every": 0,
                                   "overwrite": True})  # finetune's overwrite: an unfinished run starts again

    def remember_step0(self, s: FinetuneSettings, run: dict) -> None:
        first = next(m for m in run["metrics"] if "eval_loss" in m)
        if first["step"] == 0:
            self.step0.setdefault(step0_key(s), {k[5:]: v for k, v in first.items() if k.startswith("eval_")})

    def __call__(self, method: Method, candidate: dict, seed: int, role: str) -> dict:
        s = self.settings(method, candidate, seed, role)
        folder = Path(s.out)
        if folder in self.done:  # the selection run at the chosen setting, when it is also reported
            return self.done[folder]
        t = time.perf_counter()
        again = _finished(folder, s, self.s.overwrite)
        if not again:
            run_finetune(s, step0_eval=self.step0.get(step0_key(s)))
        run = self.done[folder] = read_run(folder)
        self.remember_step0(s, run)
        end = run["final_eval"]
        metric = metric_of(end)
        shown = f"{metric.replace('_', ' ')} {end[f'eval_{metric}']:.3f}, " if metric else ""
        took = "done before" if again else f"{time.perf_counter() - t:.0f} s"
        print(f"[{len(self.done)}/{self.total}] {method.label} {setting_name(candidate)} seed {seed} on "
              f"{ROLES[role]}: {shown}loss {end['eval_loss']:.4f} ({took})", flush=True)
        return run


def run_compare(s: CompareSettings, methods: Mapping[str, Mapping | None] | None = None, what: str = "") -> dict:
    """The whole `compare` recipe (module docstring); returns the summary also written to summary.json.
    `methods`: label -> settings of the method (`plan_methods`); default `DEFAULT_METHODS`."""
    t_start = time.perf_counter()
    s = dataclasses.replace(s)
    s.check()
    resolve_device(s.device)  # the machine, too, before any run
    plan = plan_methods({m: None for m in DEFAULT_METHODS} if methods is None else methods, s.learning_rates)
    out = check_out_folder(s.out)
    check_writable(out)
    if out.exists() and any(out.iterdir()) and not (out / PLAN).is_file() and not s.overwrite:
        raise UsageError(f"--out {str(out)!r} holds files but no comparison ({PLAN}); choose a new or empty folder, "
                         "or pass --overwrite to write into it.")
    eval_every = s.eval_every or (max(1, s.max_steps // 4) if s.max_steps else 0)
    seeds = list(range(s.seed, s.seed + s.seeds))
    report_role = "test" if s.test_data else "val"
    sources = {"val": s.eval_data, **({"test": s.test_data} if s.test_data else {})}
    total = 0  # runs: one per candidate setting where there is a choice, one per seed, less the choice run at
    for method in plan:  # the chosen setting when it is also a reported run (no test split)
        choices = len(method.candidates())
        total += s.seeds + (choices - (report_role == "val") if choices > 1 else 0)
    size = s.eval_samples or (GENERATION_SAMPLES if _scored_by_generation(s) else None)
    samples = {role: _sample(source, size, out, role) for role, source in sources.items()} if size else {}
    runs = _Runs(s, out, {role: samples[role][0]["data"] if size else source for role, source in sources.items()},
                 eval_every, total)
    for method in plan:  # a bad setting, or a finished run of other settings, is refused before any run
        for candidate in method.candidates():
            runs.settings(method, candidate, s.seed, "val").check()
            for seed, role in itertools.product(seeds, sources):
                settings = runs.settings(method, candidate, seed, role)
                if _finished(Path(settings.out), settings, s.overwrite):  # its step 0 is known to any run after
                    runs.remember_step0(settings, read_run(Path(settings.out)))
    record = {"settings": as_dict(s), "methods": {m.label: dataclasses.asdict(m) for m in plan}}
    write_text_atomic(out / PLAN, json.dumps(record, indent=2) + "\n")
    for role, (sample, text) in samples.items():
        if text is not None:
            write_text_atomic(sample["data"], text)
            print(f"{ROLES[role]} split {sources[role]}: evaluating a fixed sample of {sample['n']} of its "
                  f"{sample['of']} records (--eval-samples)", flush=True)

    results = {}
    for method in plan:
        candidates = method.candidates()
        selection = [runs(method, c, seeds[0], "val") for c in candidates] if len(candidates) > 1 else []
        best = _best(selection, s.select_by) if selection else 0
        if best is None:
            raise UsageError(f"Every setting of {method.label} diverged on the validation split (a non-finite loss), "
                             "so none can be chosen; give it lower learning rates (--lr-grid, or "
                             f"{method.label}:lr=... in --methods) or other settings.")
        chosen = candidates[best]
        results[method.label] = {
            "method": method.base, "settings": method.fixed, "grid": method.grid,
            "selection": [{"setting": c, **r} for c, r in zip(candidates, selection)],
            "chosen": chosen,
            "diverged": [c for c, r in zip(candidates, selection) if diverged(r)],
            "at_grid_edge": grid_edges(method.grid, chosen) if selection else [],
            "runs": [{"seed": seed, **runs(method, chosen, seed, report_role)} for seed in seeds],
        }
    summary = summarize(s, results, report_role, {role: sample for role, (sample, _) in samples.items()}, what)
    summary["wall_seconds"] = round(time.perf_counter() - t_start, 3)
    summary["run_seconds"] = round(math.fsum(run["init_seconds"] + run["train_seconds"] + run["eval_seconds"]
                                             for r in summary["methods"].values() for run in r["runs"]), 1)
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    split = ROLES[report_role]
    plot_comparison({label: r["curves"] for label, r in summary["methods"].items()}, out / "comparison.png",
                    summary["metric"], title=f"{summary['what']} ({split} split, {_over_seeds(s.seeds)})",
                    split=split)
    write_text_atomic(out / "report.md", report_markdown(summary))
    print("\n" + final_table(summary))
    for note in selection_notes(summary):
        print(f"note: {note}")
    print(f"\nwrote {out / 'report.md'}, {out / 'comparison.png'} and {out / 'summary.json'} "
          f"({summary['wall_seconds']:.0f} s in all)", flush=True)
    return summary


def summarize(s: CompareSettings, results: dict, report_role: str, samples: dict, what: str) -> dict:
    """Every number of the report: per method, mean and standard error over the seeds at each evaluation
    step, the difference to lora, the steps to reach lora's final loss, the init time share."""
    first = next(iter(results.values()))["runs"][0]
    metric = metric_of(first["final_eval"])
    keys = ["loss"] + ([metric] if metric else [])
    for r in results.values():
        r["curves"] = curves(r["runs"], keys)
        r["init_seconds"] = mean_se([run["init_seconds"] for run in r["runs"]])
        r["init_share"] = mean_se([run["init_seconds"] / (run["init_seconds"] + run["train_seconds"]
                                                          + run["eval_seconds"]) for run in r["runs"]])
    lora = results.get("lora")
    lora_final = lora["curves"]["loss"][-1]["mean"] if lora else None
    for label, r in results.items():
        r["vs_lora"] = ({k: difference(r["runs"], lora["runs"], k) for k in keys}
                        if lora and label != "lora" else None)
        r["steps_to_lora_final_loss"] = next((p["step"] for p in r["curves"]["loss"] if p["mean"] <= lora_final),
                                             None) if lora else None
    return {
        "what": what or f"{s.model} fine-tuned on {s.data}",
        "model": s.model, "data": s.data, "validation_data": s.eval_data, "test_data": s.test_data,
        "report_split": ROLES[report_role], "eval_samples": samples,
        "metric": metric, "selected_by": metric if metric and s.select_by == "metric" else "loss",
        "seeds": list(range(s.seed, s.seed + s.seeds)), "steps": first["steps"], "batch_size": s.batch_size,
        "eval_steps": [p["step"] for p in next(iter(results.values()))["curves"]["loss"]],
        "eval_n": first["final_eval"].get("eval_n"), "lora_final_loss": lora_final, "methods": results,
    }


def _over_seeds(n: int) -> str:
    return "one seed" if n == 1 else f"mean ± standard error over {n} seeds"


def _pm(point: dict, digits: int = 3) -> str:
    return f"{point['mean']:.{digits}f}" + (f" ± {point['se']:.{digits}f}" if point["se"] is not None else "")


def _diff(point: dict | None, digits: int = 3) -> str:
    if point is None:
        return "-"
    return f"{point['diff']:+.{digits}f}" + (f" ± {point['se']:.{digits}f}" if point["se"] is not None else "")


def final_table(summary: dict) -> str:
    """Markdown: each method at the last step, against lora."""
    metric = summary["metric"]
    name = metric.replace("_", " ") if metric else None
    head = ["method", "setting", *([name, f"{name} vs lora"] if metric else []), "loss", "loss vs lora",
            "steps to lora's final loss", "init s", "init share"]
    rows = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    for label, r in summary["methods"].items():
        vs = r["vs_lora"]
        reached = r["steps_to_lora_final_loss"]
        cells = [label, setting_name(r["chosen"])]
        if metric:
            cells += [_pm(r["curves"][metric][-1]), _diff(vs[metric][-1] if vs else None)]
        cells += [_pm(r["curves"]["loss"][-1], 4), _diff(vs["loss"][-1] if vs else None, 4),
                  "-" if summary["lora_final_loss"] is None else "not reached" if reached is None else str(reached),
                  f"{r['init_seconds']['mean']:.1f}", f"{100 * r['init_share']['mean']:.1f}%"]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _step_table(summary: dict, key: str, digits: int) -> str:
    steps = summary["eval_steps"]
    rows = ["| method | " + " | ".join(f"step {step}" for step in steps) + " |", "|---|" + "---:|" * len(steps)]
    for label, r in summary["methods"].items():
        rows.append(f"| {label} | " + " | ".join(_pm(p, digits) for p in r["curves"][key]) + " |")
    return "\n".join(rows)


def selection_notes(summary: dict) -> list[str]:
    """What the choice of each method's setting should be read with: a choice at a grid's edge, and
    the candidates that diverged (never chosen)."""
    methods = summary["methods"].items()
    return [f"{label} chose {note}: the best may lie beyond it; widen the grid." for label, r in methods
            for note in r["at_grid_edge"]] + [
        f"{label} diverged at {setting_name(c)} on the validation split (a non-finite loss): never chosen."
        for label, r in methods for c in r["diverged"]]


def _selection_section(summary: dict) -> list[str]:
    metric = summary["metric"]
    if summary["selected_by"] != "loss":
        chosen_by = (f"the validation {metric.replace('_', ' ')} at the last step (ties: the lower validation loss, "
                     "then the first in the grid)")
    else:
        chosen_by = "the validation loss at the last step (" + (
            "--select-by loss" if metric else "the data has no accuracy or exact match") + ")"
    lines = [f"## Choice of each method's setting (validation split, seed {summary['seeds'][0]})", ""]
    chose = {label: r for label, r in summary["methods"].items() if r["selection"]}
    if chose:
        lines += [f"Chosen by {chosen_by}.", ""]
        head = ["method", "setting", *([metric.replace("_", " ")] if metric else []), "loss", "chosen"]
        lines += ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 3) + "---|"]
        for label, r in chose.items():
            for c in r["selection"]:
                end = c["final_eval"]
                mark = "yes" if c["setting"] == r["chosen"] else "diverged" if c["setting"] in r["diverged"] else ""
                cells = [label, setting_name(c["setting"]), *([f"{end[f'eval_{metric}']:.3f}"] if metric else []),
                         f"{end['eval_loss']:.4f}", mark]
                lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        notes = selection_notes(summary)
        lines += [f"- {note}" for note in notes] + ([""] if notes else [])
    fixed = [label for label, r in summary["methods"].items() if not r["selection"]]
    if fixed:
        lines += [f"Nothing to choose (one setting): {', '.join(fixed)}.", ""]
    return lines


def report_markdown(summary: dict) -> str:
    metric = summary["metric"]
    name = metric.replace("_", " ") if metric else None
    seeds = summary["seeds"]
    split = summary["report_split"]
    chose = any(r["selection"] for r in summary["methods"].values())
    val = f"`{summary['validation_data']}`"
    if summary["test_data"]:
        where = (f"Reported on the **test** split `{summary['test_data']}`, which chose nothing"
                 + (f"; the settings with a choice were chosen on the validation split {val} (below)." if chose
                    else "."))
    else:
        where = (f"No test split was given: reported on the **validation** split {val}"
                 + (", which also chose the settings with a choice (below), so their numbers are optimistic." if chose
                    else "."))
    sampled = summary["eval_samples"].get("test" if summary["test_data"] else "val")
    n_text = (f"a fixed random sample of {sampled['n']} of its {sampled['of']} records" if sampled and
              sampled["n"] < sampled["of"] else f"{summary['eval_n']} records")
    error = ("mean ± standard error over the seeds (sample standard deviation / sqrt(n))" if len(seeds) > 1
             else "one seed: n=1, no error")
    lines = [
        f"# Comparison: {summary['what']}",
        "",
        (f"Model `{summary['model']}`, training data `{summary['data']}`. Every run: {summary['steps']} optimizer "
         f"step(s) of batch {summary['batch_size']} in the same data order for a given seed, evaluated at steps "
         f"{', '.join(map(str, summary['eval_steps']))}. Seed(s) {', '.join(map(str, seeds))}. {where} "
         f"Evaluated on {n_text}."),
        "",
        f"## At the last step ({split} split)",
        "",
        final_table(summary),
        "",
        (f"Cells: {error}. vs lora: the mean over seeds of the method's result minus lora's with the same seed (same "
         "data order), ± the standard error of those differences. Steps to lora's final loss (convergence speed): the "
         "first evaluation step at which the method's mean loss is at or below lora's mean loss at the last step. "
         "init s: the init's seconds (gradient + SVD, plus a linear probe for classification); init share: init / "
         "(init + train + eval) time of each run, averaged over the seeds."),
        "",
    ]
    if summary["lora_final_loss"] is None:
        lines += ["No method is named `lora`: no differences to it and no convergence speed.", ""]
    if metric:
        lines += [f"## {name.capitalize()} at each evaluation step ({split} split)", "",
                  _step_table(summary, metric, 3), ""]
    lines += [f"## Loss at each evaluation step ({split} split)", "", _step_table(summary, "loss", 4), "",
              (f"![{split} loss and {name or 'loss'} against step, mean over the seeds with a band of one standard "
               "error](comparison.png)"), ""]
    notes = sorted({f"{role} data: {note}" for r in summary["methods"].values() for run in r["runs"]
                    for role, note in run.get("data_notes", {}).items()})
    if notes:  # what was truncated, skipped or counted in the data, evaluation data included
        lines += ["## Data", "", *[f"- {n}" for n in notes], ""]
    lines += _selection_section(summary)
    lines += ["## Methods", ""]
    for label, r in summary["methods"].items():
        lines.append(f"- `{label}`: " + ", ".join(f"{k}={_text(v)}" for k, v in r["settings"].items())
                     + f"; runs at {setting_name(r['chosen'])}")
    lines += ["", (f"Run folders: `{'test' if summary['test_data'] else 'val'}/<method>/<setting>/seed-<s>/` "
                   f"(reported){', `val/...` (the choice)' if chose else ''}; each is an ordinary `lora-one finetune` "
                   "run (adapter, `lora_one.json`, `args.json`, `metrics.jsonl`). `summary.json` holds every number. "
                   f"Wall time of the last call {summary['wall_seconds']:.0f} s; the reported runs' own init, "
                   f"training and evaluation add up to {summary['run_seconds']:.0f} s."), ""]
    return "\n".join(lines)
