"""`lora-one finetune` under `torchrun` and `accelerate launch` (2 gloo processes on the CPU).

Each micro-batch of the single-process run is split across the ranks, so two processes must end with
the single-process adapter (up to float rounding) and log the same losses; rank 0 alone writes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import one_thread, question_records, sentiment_records, tiny_bert, tiny_llama, write_jsonl  # noqa: F401
from transformers import AutoConfig

from lora_one.cli import build_parser, main
from lora_one.config import resolve
from lora_one.finetune import run_finetune
from lora_one.train import TrainingInterrupted

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
        # 41 examples in micro-batches of 5: the last micro-batch of the epoch leaves rank 1 idle
        "qa": str(write_jsonl(root / "qa.jsonl", question_records(41, seed=0))),
        "qa_eval": str(write_jsonl(root / "qa_eval.jsonl", question_records(12, seed=1))),
        "sent": str(write_jsonl(root / "sent.jsonl", sentiment_records(41, seed=0))),
        "sent_eval": str(write_jsonl(root / "sent_eval.jsonl", sentiment_records(12, seed=1))),
    }


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def launch(launcher: list[str], args: list[str]) -> str:
    """Run `lora-one` under a launcher; only rank 0 reports. Returns stderr."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)}
    done = subprocess.run([*launcher, "-m", "lora_one.cli", *args], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert done.stdout.count("saved the adapter") == 1 and done.stdout.count("init ") == 1, done.stdout
    return done.stderr


def adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "adapter_model.safetensors")


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(two: Path, one: Path, checkpoint: str = "step-0000003.pt", init_processes: int = 2) -> None:
    a, b = adapter(two), adapter(one)
    assert a.keys() == b.keys()
    for name in b:
        rel = float((a[name] - b[name]).norm() / b[name].norm())
        assert rel <= 1e-4, (name, rel)
    m2, m1 = metrics(two), metrics(one)
    assert [m["step"] for m in m2] == [m["step"] for m in m1]
    for x, y in zip(m2, m1):
        for key in y:
            assert x[key] == pytest.approx(y[key], rel=1e-4, abs=1e-6), (key, x, y)
    sidecar = json.loads((two / "lora_one.json").read_text())
    assert sidecar["training"]["processes"] == 2 and sidecar["world_size"] == init_processes
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    assert [p.name for p in (two / "checkpoints").iterdir()] == [checkpoint]
    assert len(torch.load(two / "checkpoints" / checkpoint, weights_only=True)["rng"]) == 2


def test_torchrun_matches_one_process(tiny, tmp_path):
    args = ["finetune", "--model", tiny["llama"], "--data", tiny["qa"], "--eval-data", tiny["qa_eval"],
            "--rank", "4", "--init-samples", "6", "--init-batch-size", "2", "--batch-size", "5",
            "--grad-accum", "3", "--lr", "5e-3", "--quiet"]
    launch(TORCHRUN, [*args, "--out", str(tmp_path / "two")])
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    assert_same_run(tmp_path / "two", tmp_path / "one")


def test_accelerate_launch_matches_one_process(tiny, tmp_path):
    args = ["finetune", "--model", tiny["bert"], "--data", tiny["sent"], "--eval-data", tiny["sent_eval"],
            "--rank", "4", "--init-samples", "4", "--batch-size", "5", "--grad-accum", "3", "--lr", "5e-3",
            "--precondition", "--head-init", "probe", "--probe-samples", "41", "--quiet"]
    launch([str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517"],
           [*args, "--out", str(tmp_path / "two")])
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    assert_same_run(tmp_path / "two", tmp_path / "one")


def test_two_processes_resume_a_one_process_checkpoint(tiny, tmp_path):
    args = ["finetune", "--model", tiny["llama"], "--data", tiny["qa"], "--eval-data", tiny["qa_eval"],
            "--rank", "4", "--init-samples", "4", "--batch-size", "5", "--max-steps", "6", "--save-every", "2",
            "--lr", "5e-3", "--quiet"]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0

    def ctrl_c_at_step_3(step, entry):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(TrainingInterrupted):
        run_finetune(resolve(build_parser().parse_args([*args, "--out", str(tmp_path / "two")])),
                     on_step=ctrl_c_at_step_3)
    stderr = launch(TORCHRUN, [*args, "--out", str(tmp_path / "two"), "--resume"])
    assert "written by 1 processes, this run has 2" in stderr
    # the resumed run kept the one-process init from the checkpoint
    assert_same_run(tmp_path / "two", tmp_path / "one", checkpoint="step-0000006.pt", init_processes=1)


@pytest.mark.parametrize("env,message", [
    ({"ACCELERATE_USE_FSDP": "true"}, "with FSDP"),
    ({"ACCELERATE_USE_DEEPSPEED": "true"}, "with DeepSpeed"),
    ({"ACCELERATE_MIXED_PRECISION": "fp16"}, "no fp16"),
    ({"ACCELERATE_MIXED_PRECISION": "bf16"}, "Pass --bf16"),
])
def test_launcher_settings_the_loop_would_ignore_are_refused(tiny, tmp_path, capsys, monkeypatch, env, message):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    args = ["finetune", "--model", tiny["llama"], "--data", tiny["qa"], "--out", str(tmp_path / "run"), "--quiet"]
    assert main(args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
