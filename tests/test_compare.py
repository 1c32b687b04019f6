"""`lora-one compare`: the choice on the validation split, the runs over seeds on the test split, the
statistics against a hand computation from the runs' own files, shared step-0 evaluations, resuming,
evaluation samples and one-line refusals. Tiny models (seconds), or a stand-in for `run_finetune`
that writes a finished run folder with chosen numbers (milliseconds)."""

from __future__ import annotations

import json
import math
import random
import re
import typing
from pathlib import Path

import pytest
from tiny_models import one_thread, question_records, tiny_llama, write_jsonl  # noqa: F401

from lora_one.cli import main
from lora_one.cli.compare import parse_methods
from lora_one.core.errors import UsageError
from lora_one.recipes import compare
from lora_one.recipes.compare import CompareSettings, grid_edges, plan_methods, run_compare
from lora_one.recipes.settings import as_dict


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {
        "llama": str(tiny_llama(root / "llama")),
        "train": str(write_jsonl(root / "train.jsonl", question_records(48, seed=0))),
        "val": str(write_jsonl(root / "val.jsonl", question_records(12, seed=1))),
        "test": str(write_jsonl(root / "test.jsonl", question_records(12, seed=2))),
    }


def settings(tiny, out, **changes) -> CompareSettings:
    defaults = {"model": tiny["llama"], "data": tiny["train"], "eval_data": tiny["val"], "test_data": tiny["test"],
                "out": str(out), "rank": 4, "init_samples": 4, "batch_size": 4, "max_steps": 4, "eval_every": 2,
                "seeds": 2, "lr_grid": "5e-3,2e-2", "quiet": True}
    return CompareSettings(**{**defaults, **changes})


def spy(monkeypatch) -> list:
    """Record each `run_finetune` call of compare: (settings, step0_eval)."""
    calls, real = [], compare.run_finetune

    def run(s, step0_eval=None, callbacks=()):
        calls.append((s, step0_eval))
        return real(s, step0_eval=step0_eval, callbacks=callbacks)

    monkeypatch.setattr(compare, "run_finetune", run)
    return calls


def metrics_of(folder) -> list[dict]:
    return [json.loads(line) for line in (Path(folder) / "metrics.jsonl").read_text().splitlines()]


def evals_of(folder) -> dict[int, dict]:
    return {m["step"]: m for m in metrics_of(folder) if "eval_loss" in m}


def by_hand(values):
    """Mean and standard error written out: sqrt(sum of squared deviations / (n - 1)) / sqrt(n)."""
    n = len(values)
    mean = sum(values) / n
    return mean, (sum((v - mean) ** 2 for v in values) / (n - 1)) ** 0.5 / n ** 0.5


METHODS = {"lora": None, "lora-one": None, "lora-one+precond": {"prec_reg": 1e-6}}


def test_compare_on_a_tiny_model(tiny, tmp_path, monkeypatch, capsys):
    out = tmp_path / "cmp"
    calls = spy(monkeypatch)
    summary = run_compare(settings(tiny, out), METHODS)
    printed = capsys.readouterr().out
    assert json.loads((out / "summary.json").read_text()) == summary
    assert (out / "comparison.png").stat().st_size > 0
    report = (out / "report.md").read_text()
    assert "| lora-one+precond |" in report and "**test** split" in report
    # a progress line per run: 2 choice runs and 2 seeds per method
    assert [line.split("]")[0] for line in printed.splitlines() if line.startswith("[")] == \
        [f"[{i}/12" for i in range(1, 13)]
    assert len(calls) == 12

    for label, r in summary["methods"].items():
        # the choice: the best validation accuracy at the last step (ties: lower loss), from the runs' own files
        val_runs = sorted((out / "val" / label).glob("lr=*/seed-0"))
        assert len(val_runs) == 2
        ends = {folder.parent.name: evals_of(folder)[4] for folder in val_runs}
        best = max(ends, key=lambda k: (ends[k]["eval_accuracy"], -ends[k]["eval_loss"]))
        assert f"lr={r['chosen']['lr']:g}" == best
        # every seed ran at the chosen setting on the test split, and only there
        assert sorted(p.relative_to(out / "test" / label).as_posix() for p in (out / "test" / label).glob("*/*")) \
            == [f"{best}/seed-0", f"{best}/seed-1"]
        for seed in (0, 1):
            assert evals_of(out / "test" / label / best / f"seed-{seed}")[4]["eval_n"] == 12

    # the statistics, by hand from the test runs' metrics.jsonl and lora_one.json
    def folder(label, seed):
        return out / "test" / label / f"lr={summary['methods'][label]['chosen']['lr']:g}" / f"seed-{seed}"

    lora_end = by_hand([evals_of(folder("lora", s))[4]["eval_loss"] for s in (0, 1)])[0]
    assert summary["lora_final_loss"] == pytest.approx(lora_end, rel=1e-12)
    for label, r in summary["methods"].items():
        runs = [evals_of(folder(label, s)) for s in (0, 1)]
        for key in ("accuracy", "loss"):
            assert [p["step"] for p in r["curves"][key]] == [0, 2, 4]
            for point in r["curves"][key]:
                mean, se = by_hand([e[point["step"]][f"eval_{key}"] for e in runs])
                assert point["mean"] == pytest.approx(mean, rel=1e-12, abs=1e-15)
                assert point["se"] == pytest.approx(se, rel=1e-9, abs=1e-15)
                if label != "lora":  # paired by seed: the mean and se of the per-seed differences
                    lora_runs = [evals_of(folder("lora", s)) for s in (0, 1)]
                    d_mean, d_se = by_hand([e[point["step"]][f"eval_{key}"] - f[point["step"]][f"eval_{key}"]
                                            for e, f in zip(runs, lora_runs)])
                    diff = next(d for d in r["vs_lora"][key] if d["step"] == point["step"])
                    assert diff["diff"] == pytest.approx(d_mean, rel=1e-9, abs=1e-15)
                    assert diff["se"] == pytest.approx(d_se, rel=1e-9, abs=1e-15)
        loss_means = {step: by_hand([e[step]["eval_loss"] for e in runs])[0] for step in (0, 2, 4)}
        assert r["steps_to_lora_final_loss"] == next((s for s in (0, 2, 4) if loss_means[s] <= lora_end), None)
        times = [json.loads((folder(label, s) / "lora_one.json").read_text())["training"] for s in (0, 1)]
        shares = [t["init_seconds"] / (t["init_seconds"] + t["train_seconds"] + t["eval_seconds"]) for t in times]
        assert r["init_share"]["mean"] == pytest.approx(sum(shares) / 2, rel=1e-12)
    assert summary["methods"]["lora"]["vs_lora"] is None

    # shared step-0 evaluations: a run gets one iff an earlier run had the same init (variant, seed) and split,
    # and it is that run's
    first = {}
    for s, step0 in calls:
        key = (s.variant, s.seed, s.eval_data)
        if key in first:
            assert step0 == {k[5:]: v for k, v in first[key].items() if k.startswith("eval_")}
        else:
            assert step0 is None
            first[key] = evals_of(s.out)[0]
        assert evals_of(s.out)[0] == first[key]
    assert len(first) == 6  # (lora, lora-one) x (seed 0 on validation, seeds 0 and 1 on test)

    # resumed: nothing runs again, the same numbers
    calls.clear()
    again = run_compare(settings(tiny, out), METHODS)
    assert calls == []
    assert {k: v for k, v in again.items() if k != "wall_seconds"} == \
        {k: v for k, v in summary.items() if k != "wall_seconds"}
    # an unfinished run (no adapter yet) runs again, alone, from its own step-0 evaluation's share
    unfinished = folder("lora-one", 1)
    (unfinished / "adapter_config.json").unlink()
    again = run_compare(settings(tiny, out), METHODS)
    assert [Path(s.out) for s, _ in calls] == [unfinished] and calls[0][1] is not None
    assert again["methods"]["lora-one"]["curves"] == summary["methods"]["lora-one"]["curves"]
    # other settings: refused before anything runs, unless --overwrite
    with pytest.raises(UsageError, match="finished run with other settings"):
        run_compare(settings(tiny, out, max_steps=6), METHODS)
    assert len(calls) == 1


# ---------------------------------------------------------------- with a stand-in for run_finetune

VAL_ACC = {2e-4: 0.50, 5e-4: 0.60, 1e-3: 0.70}  # the validation split prefers 1e-3 ...
TEST_ACC = {2e-4: 0.90, 5e-4: 0.60, 1e-3: 0.40}  # ... the test split 2e-4


def fake_finetune(tiny, calls, val_loss=None):
    """Writes a finished run whose numbers depend on the split, the lr, the seed and the step
    (`val_loss`: lr -> the validation loss instead, at every step)."""
    def run(s, step0_eval=None, callbacks=()):
        calls.append(s)
        out = Path(s.out)
        out.mkdir(parents=True, exist_ok=True)
        acc = (TEST_ACC if s.eval_data == tiny["test"] else VAL_ACC)[s.lr]
        fixed = val_loss[s.lr] if val_loss and s.eval_data == tiny["val"] else None
        metrics = [{"step": step, "eval_loss": (fixed or 2.0 - acc * step / 4) + 0.1 * s.seed,
                    "eval_accuracy": acc * step / 4 + 0.01 * s.seed ** 2, "eval_n": 12}
                   for step in range(0, s.max_steps + 1, s.eval_every)]
        training = {"steps": s.max_steps, "init_seconds": 1.0 + s.seed, "train_seconds": 3.0, "eval_seconds": 1.0,
                    "step0_eval": metrics[0], "final_eval": metrics[-1]}
        (out / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
        (out / "args.json").write_text(json.dumps(as_dict(s)))
        (out / "lora_one.json").write_text(json.dumps({"training": training}))
        (out / "adapter_config.json").write_text("{}")
    return run


def test_the_choice_never_reads_the_test_split(tiny, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(compare, "run_finetune", fake_finetune(tiny, calls))
    summary = run_compare(settings(tiny, tmp_path / "cmp", lr_grid="2e-4,5e-4,1e-3", seeds=3), {"lora": None})
    r = summary["methods"]["lora"]
    assert r["chosen"] == {"lr": 1e-3}
    # the largest of the grid: the report and the output say the best may lie beyond it
    assert r["at_grid_edge"] == ["lr=0.001, the largest of 0.0002, 0.0005, 0.001"]
    assert "- lora chose lr=0.001, the largest of 0.0002, 0.0005, 0.001: the best may lie beyond it; widen the " \
        "grid." in (tmp_path / "cmp" / "report.md").read_text()
    assert [(s.eval_data, s.lr, s.seed) for s in calls] == \
        [(tiny["val"], lr, 0) for lr in (2e-4, 5e-4, 1e-3)] + [(tiny["test"], 1e-3, seed) for seed in (0, 1, 2)]
    # seeds 0, 1, 2 add 0, 0.01, 0.04 to the accuracy: mean 0.4 + 0.05 / 3, standard error by hand
    end = r["curves"]["accuracy"][-1]
    deviations = [0.0 - 0.05 / 3, 0.01 - 0.05 / 3, 0.04 - 0.05 / 3]
    assert end["mean"] == pytest.approx(0.4 + 0.05 / 3, rel=1e-12)
    assert end["se"] == pytest.approx(math.sqrt(sum(d * d for d in deviations) / 2 / 3), rel=1e-12)
    assert r["init_seconds"]["mean"] == pytest.approx(2.0) and r["init_share"]["mean"] == pytest.approx(
        (1 / 5 + 2 / 6 + 3 / 7) / 3)


def test_without_a_test_split_the_validation_split_is_reported_and_said(tiny, tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(compare, "run_finetune", fake_finetune(tiny, calls))
    summary = run_compare(settings(tiny, tmp_path / "cmp", test_data=None, lr_grid="2e-4,1e-3", seeds=2, eval_every=0,
                                   max_steps=8), {"lora": None, "lora-one": {"lr": 5e-4}})
    # the choice run at the chosen lr is also seed 0's reported run; lora-one has one setting: nothing to choose
    assert [(s.variant, s.lr, s.seed) for s in calls] == [("lora", 2e-4, 0), ("lora", 1e-3, 0), ("lora", 1e-3, 1),
                                                          ("lora-one", 5e-4, 0), ("lora-one", 5e-4, 1)]
    assert all(s.eval_data == tiny["val"] for s in calls)
    assert summary["report_split"] == "validation" and summary["eval_steps"] == [0, 2, 4, 6, 8]  # a quarter of 8
    assert [line[:5] for line in capsys.readouterr().out.splitlines() if line.startswith("[")] == \
        ["[1/5]", "[2/5]", "[3/5]", "[4/5]", "[5/5]"]
    report = (tmp_path / "cmp" / "report.md").read_text()
    assert "No test split was given" in report and "Nothing to choose (one setting): lora-one." in report


def test_one_seed_has_no_error(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(compare, "run_finetune", fake_finetune(tiny, []))
    summary = run_compare(settings(tiny, tmp_path / "cmp", seeds=1), {"lora": {"lr": 5e-4}, "pissa": {"lr": 1e-3}})
    end = summary["methods"]["pissa"]["curves"]["accuracy"][-1]
    assert end["n"] == 1 and end["se"] is None and summary["methods"]["pissa"]["vs_lora"]["accuracy"][-1]["se"] is None
    assert "n=1, no error" in (tmp_path / "cmp" / "report.md").read_text()


def test_a_setting_that_acts_on_nothing_does_not_make_a_finished_run_another(tiny, tmp_path, monkeypatch):
    """The damping acts only with the preconditioner: runs without it are read back whatever their damping
    (a changed default must not throw them away); a preconditioned run of another damping is refused."""
    calls = []
    monkeypatch.setattr(compare, "run_finetune", fake_finetune(tiny, calls))
    old = {"lora": {"lr": 5e-4, "prec_reg": 1e-6}, "lora-one+precond": {"lr": 5e-4, "prec_reg": 1e-6}}
    run_compare(settings(tiny, tmp_path / "cmp", seeds=1), old)
    assert len(calls) == 2
    run_compare(settings(tiny, tmp_path / "cmp", seeds=1), {"lora": {"lr": 5e-4, "prec_reg": 1e-2}})
    assert len(calls) == 2
    with pytest.raises(UsageError, match="prec_reg 1e-06 there, 0.01 now"):
        run_compare(settings(tiny, tmp_path / "cmp", seeds=1), {"lora-one+precond": {"lr": 5e-4, "prec_reg": 1e-2}})


@pytest.mark.parametrize("select_by, chosen", [("metric", 1e-3), ("loss", 5e-4)])
def test_select_by(select_by, chosen, tiny, tmp_path, monkeypatch):
    """The validation accuracy prefers 1e-3 (VAL_ACC), the validation loss 5e-4."""
    monkeypatch.setattr(compare, "run_finetune", fake_finetune(tiny, [], val_loss={2e-4: 0.9, 5e-4: 0.5, 1e-3: 0.7}))
    summary = run_compare(settings(tiny, tmp_path / "cmp", lr_grid="2e-4,5e-4,1e-3", seeds=1, select_by=select_by),
                          {"lora": None})
    assert summary["methods"]["lora"]["chosen"] == {"lr": chosen}
    assert summary["selected_by"] == {"metric": "accuracy", "loss": "loss"}[select_by]
    said = "Chosen by the validation loss at the last step (--select-by loss)"
    assert (said in (tmp_path / "cmp" / "report.md").read_text()) == (select_by == "loss")



# Every setting of a compare run whose value may be a container, with such a value: args.json holds it as JSON
NON_SCALAR = {"gamma": (64.0, 128.0)}  # a gamma grid, searched by every run's init


def test_the_non_scalar_settings_are_all_known():
    def containers(hint):
        return {typing.get_origin(t) or t for t in (hint, *typing.get_args(hint))} & {tuple, list, dict, set}
    assert {name for name, hint in typing.get_type_hints(CompareSettings).items() if containers(hint)} == \
        set(NON_SCALAR)


@pytest.mark.parametrize("name", NON_SCALAR)
def test_a_comparison_with_a_non_scalar_setting_resumes(name, tiny, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(compare, "run_finetune", fake_finetune(tiny, calls))
    s = settings(tiny, tmp_path / "cmp", lr_grid="2e-4,1e-3", seeds=1, **{name: NON_SCALAR[name]})
    first = run_compare(s, {"lora-one": None})
    assert len(calls) == 3  # two candidates, one seed on the test split
    assert json.loads((Path(calls[0].out) / "args.json").read_text())[name] == list(NON_SCALAR[name])
    again = run_compare(s, {"lora-one": None})
    assert len(calls) == 3 and again["methods"] == first["methods"]


def test_a_candidate_that_diverged_is_never_chosen_and_the_report_says_so(tiny, tmp_path, monkeypatch, capsys):
    """1e-3 has the best validation accuracy and 2e-4 comes first, but both have a NaN loss: 5e-4 is chosen,
    by the metric or by the loss."""
    nan = float("nan")
    for select_by in ("metric", "loss"):
        out = tmp_path / select_by
        monkeypatch.setattr(compare, "run_finetune", fake_finetune(tiny, [], val_loss={2e-4: nan, 5e-4: 0.5,
                                                                                       1e-3: nan}))
        summary = run_compare(settings(tiny, out, lr_grid="2e-4,5e-4,1e-3", seeds=1, select_by=select_by),
                              {"lora": None})
        r = summary["methods"]["lora"]
        assert r["chosen"] == {"lr": 5e-4}, select_by
        assert r["diverged"] == [{"lr": 2e-4}, {"lr": 1e-3}]
        report, printed = (out / "report.md").read_text(), capsys.readouterr().out
        for lr in ("0.0002", "0.001"):
            note = f"lora diverged at lr={lr} on the validation split (a non-finite loss): never chosen."
            assert f"- {note}" in report and f"note: {note}" in printed
            assert re.search(rf"\| lora \| lr={lr} \|.* \| nan \| diverged \|", report)
    monkeypatch.setattr(compare, "run_finetune", fake_finetune(tiny, [], val_loss={2e-4: nan, 1e-3: float("inf")}))
    with pytest.raises(UsageError, match="Every setting of lora diverged on the validation split"):
        run_compare(settings(tiny, tmp_path / "all", lr_grid="2e-4,1e-3", seeds=1), {"lora": None})


def test_grid_edges():
    grid = {"lr": [2e-4, 5e-4, 1e-3], "gamma": [64.0, 128.0], "dora": [True, False]}
    assert grid_edges(grid, {"lr": 5e-4, "gamma": 64.0, "dora": True}) == ["gamma=64, the smallest of 64, 128"]
    assert grid_edges(grid, {"lr": 2e-4, "gamma": 128.0, "dora": False}) == [
        "lr=0.0002, the smallest of 0.0002, 0.0005, 0.001", "gamma=128, the largest of 64, 128"]
    assert grid_edges({"lr": [1e-3]}, {"lr": 1e-3}) == []  # one value: no choice, no edge
    assert grid_edges({"gamma": ["auto", 64.0]}, {"gamma": 64.0}) == []  # not all numbers: no order


def test_methods_and_grids(tiny):
    methods = parse_methods("lora,lora-one:gamma=64/128:init-samples=4,dora-one:lr=1e-3:precondition=true")
    assert methods == {"lora": {"method": "lora"},
                       "lora-one:gamma=64/128:init-samples=4": {"method": "lora-one", "gamma": [64.0, 128.0],
                                                                "init_samples": 4},
                       "dora-one:lr=1e-3:precondition=true": {"method": "dora-one", "lr": 1e-3, "precondition": True}}
    plan = plan_methods(methods, [2e-4, 5e-4])
    assert [len(m.candidates()) for m in plan] == [2, 4, 1]
    assert plan[1].fixed == {"variant": "lora-one", "init_samples": 4}
    assert plan[1].candidates()[1] == {"lr": 2e-4, "gamma": 128.0}
    assert plan[2].fixed == {"variant": "lora-one", "dora": True, "precondition": True}


def test_eval_samples(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(compare, "run_finetune", fake_finetune(tiny, []))
    out = tmp_path / "cmp"
    summary = run_compare(settings(tiny, out, eval_samples=5, test_data=None, seeds=1), {"lora": {"lr": 5e-4}})
    sample = Path(summary["eval_samples"]["val"]["data"])
    assert sample.parent == out / "data" and summary["eval_samples"]["val"]["of"] == 12
    records = [json.loads(line) for line in sample.read_text().splitlines()]
    assert len(records) == 5 and all(r in question_records(12, seed=1) for r in records)
    assert json.loads((out / "val" / "lora" / "lr=0.0005" / "seed-0" / "args.json").read_text())["eval_data"] == \
        str(sample)
    # open responses (exact match by generation) are sampled by default; a closed label set is not
    rng = random.Random(0)
    words = ["city", "river", "king", "year", "born", "built"]
    open_qa = [{"prompt": "question : what ?", "response": " " + " ".join(rng.choices(words, k=4))} for _ in range(200)]
    write_jsonl(tmp_path / "open.jsonl", open_qa)
    open_data = str(tmp_path / "open.jsonl")
    open_run = settings(tiny, tmp_path / "open", data=open_data, eval_data=open_data, test_data=None, seeds=1)
    assert compare._scored_by_generation(open_run) and not compare._scored_by_generation(settings(tiny, out))
    summary = run_compare(open_run, {"lora": {"lr": 5e-4}})
    assert summary["eval_samples"]["val"]["n"] == compare.GENERATION_SAMPLES


@pytest.mark.parametrize("extra,message", [
    (["--methods", "lora,qlora"], "Unknown method 'qlora'"),
    (["--methods", ""], "names no method"),
    (["--lr-grid", ","], "names no learning rate"),
    (["--lr-grid", "1e-3,fast"], "comma-separated numbers"),
    (["--seeds", "0"], "--seeds must be >= 1"),
    (["--lr", "1e-3"], "--lr is set by compare"),
    (["--methods", "lora:max_steps=3"], "is the same for every method"),
    (["--methods", "lora:rank=many"], "not a valid int"),
    (["--methods", "lora:rank"], "key=value"),
    (["--methods", "lora-one:lr=2"], "must lie in (0, 1)"),
])
def test_bad_input_is_one_error_line(tiny, tmp_path, capsys, extra, message):
    out = tmp_path / "cmp"
    args = ["compare", "--model", tiny["llama"], "--data", tiny["train"], "--eval-data", tiny["val"], "--out", str(out),
            "--max-steps", "2", *extra]
    assert main(args) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in err, err
    assert not out.exists()


def test_an_out_folder_of_other_files_is_refused(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(compare, "run_finetune", fake_finetune(tiny, []))
    out = tmp_path / "mine"
    out.mkdir()
    (out / "report.md").write_text("my notes")
    with pytest.raises(UsageError, match="holds files but no comparison"):
        run_compare(settings(tiny, out, seeds=1), {"lora": {"lr": 5e-4}})
    assert (out / "report.md").read_text() == "my notes"


def _fake_run(seed: int, losses: dict[int, float]) -> dict:
    return {"seed": seed, "metrics": [{"step": s, "train_loss": 9.0} for s in losses]
            + [{"step": s, "eval_loss": v} for s, v in losses.items()]}


def test_difference_pairs_runs_by_seed_and_refuses_what_cannot_be_paired():
    a = [_fake_run(2, {0: 1.0, 4: 0.5}), _fake_run(0, {0: 1.0, 4: 0.7}), _fake_run(1, {0: 1.0, 4: 0.2})]
    b = [_fake_run(0, {0: 2.0, 4: 0.4}), _fake_run(1, {0: 2.0, 4: 0.4}), _fake_run(2, {0: 2.0, 4: 0.1})]
    got = compare.difference(a, b, "loss")
    diffs = [0.7 - 0.4, 0.2 - 0.4, 0.5 - 0.1]  # seeds 0, 1, 2
    mean = sum(diffs) / 3
    se = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 2) / math.sqrt(3)
    assert [p["step"] for p in got] == [0, 4]
    assert got[0]["diff"] == pytest.approx(-1.0) and got[0]["se"] == pytest.approx(0.0, abs=1e-15)
    assert got[1]["diff"] == pytest.approx(mean) and got[1]["se"] == pytest.approx(se)
    with pytest.raises(UsageError, match="seeds"):
        compare.difference(a, b[:2], "loss")
    with pytest.raises(UsageError, match="different steps"):
        compare.difference(a, [*b[:2], _fake_run(2, {0: 2.0, 2: 0.3})], "loss")
