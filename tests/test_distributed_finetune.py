"""`lora-one finetune` under `torchrun` and `accelerate launch` (2 gloo processes on the CPU).

Each micro-batch of the single-process run is split across the processes (the Trainer's DDP, with the
loss terms counted over all of them), so two processes must end with the single-process adapter (up
to float rounding) and log the same losses; the main process alone writes.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from numerics import gradient_tol, output_tol
from safetensors.torch import load_file
from tiny_models import one_thread, question_records, sentiment_records, tiny_bert, tiny_llama, write_jsonl  # noqa: F401
from transformers import AutoConfig, AutoTokenizer, TrainerCallback

from lora_one.cli import build_parser, main
from lora_one.cli.args import settings_from
from lora_one.recipes.data import prepare
from lora_one.recipes.finetune import TrainingInterrupted, run_finetune

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    bert = tiny_bert(root / "bert")
    config = AutoConfig.from_pretrained(bert)  # no dropout: two processes draw other masks than one
    config.hidden_dropout_prob = config.attention_probs_dropout_prob = 0.0
    config.save_pretrained(bert)
    return {
        "llama": str(tiny_llama(root / "llama")),
        "bert": str(bert),
        # 40 examples in micro-batches of 4, 3 per step: the epoch's last step has one micro-batch
        "qa": str(write_jsonl(root / "qa.jsonl", question_records(40, seed=0))),
        "qa_eval": str(write_jsonl(root / "qa_eval.jsonl", question_records(12, seed=1))),
        "sent": str(write_jsonl(root / "sent.jsonl", sentiment_records(40, seed=0))),
        "sent_eval": str(write_jsonl(root / "sent_eval.jsonl", sentiment_records(12, seed=1))),
    }


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def launch(launcher: list[str], args: list[str], expect: int = 0) -> subprocess.CompletedProcess:
    """Run `lora-one` under a launcher; only the main process reports."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)}
    done = subprocess.run([*launcher, "-m", "lora_one.cli", *args], env=env, capture_output=True, text=True,
                          timeout=600)
    if expect:
        assert done.returncode != 0, done.stdout[-2000:]
        return done
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert done.stdout.count("saved the adapter") == 1 and done.stdout.count("init ") == 1, done.stdout
    return done


def adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "adapter_model.safetensors")


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# NOT derived from the arithmetic (issue 19): after the two runs' arithmetic first differs at the same
# weights, AdamW divides each gradient entry by its own running magnitude, so the round-off of an entry near
# zero moves its update by up to lr, and no bound follows from the per-step round-off alone. Observed here:
# adapters 8.5e-6, logged numbers 3.5e-6 (relative).
TRAINED = 1e-4
EXACT = ("step", "lr", "eval_accuracy")  # counts and float64 schedules: the same on both sides


def step_tols(model: str, data: str, examples: int) -> dict[str, float]:
    """Relative bounds between two float32 computations, by other batching, of one step's gradient (its norm)
    and its loss at the same weights: each within its bound of the exact value, over at most `examples`
    of the longest records."""
    feats = prepare([json.loads(line) for line in Path(data).read_text().splitlines()],
                    AutoTokenizer.from_pretrained(model), "causal-lm")
    longest = max(len(f["input_ids"]) for f in feats)
    rows = [{"input_ids": torch.zeros(longest, dtype=torch.long), "labels": torch.zeros(longest, dtype=torch.long)}]
    config = AutoConfig.from_pretrained(model)
    return {"grad_norm": 2 * gradient_tol(config, rows * examples),
            "train_loss": 2 * output_tol(config, longest, examples * longest)}


def assert_same_run(two: Path, one: Path, checkpoint: str, init_processes: int = 2, same_until: int = -1,
                    step_tol: dict[str, float] | None = None) -> None:
    """`same_until`: the last step both runs took in one process (the same arithmetic: equal bit for bit);
    `step_tol`: the bounds of the next step (`step_tols`), taken at the same weights."""
    a, b = adapter(two), adapter(one)
    assert a.keys() == b.keys()
    for name in b:
        rel = float((a[name] - b[name]).norm() / b[name].norm())
        assert rel <= TRAINED, (name, rel)
    m2, m1 = metrics(two), metrics(one)
    assert [m["step"] for m in m2] == [m["step"] for m in m1]
    for x, y in zip(m2, m1):
        assert x.keys() == y.keys(), (x, y)
        for key in y:
            if key in EXACT or x["step"] <= same_until:
                assert x[key] == y[key], (key, x, y)
            elif x["step"] == same_until + 1 and step_tol and key in step_tol:
                assert x[key] == pytest.approx(y[key], rel=step_tol[key]), (key, x, y)
            else:
                assert x[key] == pytest.approx(y[key], rel=TRAINED, abs=1e-6), (key, x, y)
    sidecar = json.loads((two / "lora_one.json").read_text())
    assert sidecar["training"]["processes"] == 2 and sidecar["world_size"] == init_processes
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    assert sorted(p.name for p in (two / checkpoint).glob("rng_state*")) == ["rng_state_0.pth", "rng_state_1.pth"]


def test_torchrun_matches_one_process(tiny, tmp_path):
    args = ["finetune", "--model", tiny["llama"], "--data", tiny["qa"], "--eval-data", tiny["qa_eval"],
            "--rank", "4", "--init-samples", "6", "--init-batch-size", "2", "--batch-size", "4",
            "--grad-accum", "3", "--lr", "5e-3", "--quiet"]
    launch(TORCHRUN, [*args, "--out", str(tmp_path / "two")])
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    assert_same_run(tmp_path / "two", tmp_path / "one", "checkpoint-4")


def test_accelerate_launch_matches_one_process(tiny, tmp_path):
    args = ["finetune", "--model", tiny["bert"], "--data", tiny["sent"], "--eval-data", tiny["sent_eval"],
            "--rank", "4", "--init-samples", "4", "--batch-size", "4", "--grad-accum", "3", "--lr", "5e-3",
            "--precondition", "--head-init", "probe", "--probe-samples", "40", "--quiet"]
    with socket.socket() as free:  # a port no other program holds now, not a fixed one
        free.bind(("127.0.0.1", 0))
        port = str(free.getsockname()[1])
    launch([str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", port],
           [*args, "--out", str(tmp_path / "two")])
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    assert_same_run(tmp_path / "two", tmp_path / "one", "checkpoint-4")


def test_two_processes_resume_a_one_process_checkpoint(tiny, tmp_path):
    args = ["finetune", "--model", tiny["llama"], "--data", tiny["qa"], "--eval-data", tiny["qa_eval"],
            "--rank", "4", "--init-samples", "4", "--batch-size", "4", "--max-steps", "6", "--save-every", "2",
            "--lr", "5e-3", "--quiet"]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0

    class CtrlCDuringStep3(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 2:
                os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(TrainingInterrupted) as info:
        run_finetune(settings_from(build_parser().parse_args([*args, "--out", str(tmp_path / "two")])),
                     callbacks=(CtrlCDuringStep3(),))
    launch(TORCHRUN, [*args, "--out", str(tmp_path / "two"), "--resume"])
    # the resumed run kept the one-process init from the saved step-0 adapter, and the steps until the
    # interruption; the first step on two processes starts from the same weights
    assert_same_run(tmp_path / "two", tmp_path / "one", "checkpoint-6", init_processes=1,
                    same_until=info.value.step, step_tol=step_tols(tiny["llama"], tiny["qa"], 4))


def test_a_batch_that_does_not_split_over_the_processes_is_refused(tiny, tmp_path):
    done = launch(TORCHRUN, ["finetune", "--model", tiny["llama"], "--data", tiny["qa"], "--batch-size", "5",
                             "--out", str(tmp_path / "run"), "--quiet"], expect=2)
    assert done.stderr.count("error: --batch-size 5 does not split over 2 processes") == 2, done.stderr[-3000:]
    # torchrun reports the failed processes with a traceback of its own; ours end in the one line
    assert not [line for line in done.stderr.splitlines() if "lora_one" in line and 'File "' in line]
