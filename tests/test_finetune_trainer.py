"""What `finetune` gains from `transformers.Trainer`: gradient checkpointing, mixed precision policies,
reporting to TensorBoard, and pushing to the Hub (refused offline, before any work)."""

from __future__ import annotations

import json

import pytest
import torch
from numerics import U32
from safetensors.torch import load_file
from tiny_models import one_thread, tiny_llama_and_questions  # noqa: F401 (fixtures: one_thread, tiny)

from lora_one.cli import main


def finetune(tiny, out, *extra):
    return main(["finetune", "--model", tiny["llama"], "--data", tiny["qa"], "--eval-data", tiny["qa_eval"],
                 "--out", str(out), "--rank", "4", "--init-samples", "4", "--batch-size", "4", "--max-steps", "3",
                 "--lr", "5e-3", "--quiet", *extra])


def errors(capsys) -> list[str]:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return [line for line in err.splitlines() if "error:" in line]


def test_gradient_checkpointing_trains_the_same_adapter(tiny, tmp_path):
    assert finetune(tiny, tmp_path / "plain") == 0
    assert finetune(tiny, tmp_path / "ckpt", "--gradient-checkpointing") == 0
    a, b = (load_file(tmp_path / run / "adapter_model.safetensors") for run in ("plain", "ckpt"))
    assert a.keys() == b.keys()
    for k in a:  # recomputed activations, the same arithmetic
        assert torch.equal(b[k], a[k]), k
    assert json.loads((tmp_path / "ckpt" / "args.json").read_text())["gradient_checkpointing"] is True


def test_report_to_tensorboard_logs_the_run(tiny, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    assert finetune(tiny, out, "--report-to", "tensorboard") == 0
    events = list((out / "runs").rglob("events.out.tfevents.*"))
    assert events
    scalars = EventAccumulator(str(events[0].parent)).Reload().Tags()["scalars"]
    assert {"train/loss", "eval/loss", "eval/accuracy"} <= set(scalars), scalars
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = EventAccumulator(str(events[0].parent)).Reload().Scalars("train/loss")
    # TensorBoard keeps a scalar in float32: one rounding of the float64 value logged
    assert [e.value for e in logged] == pytest.approx([m["train_loss"] for m in metrics if "train_loss" in m], rel=U32)


def test_what_this_machine_cannot_do_is_refused_before_any_work(tiny, tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    assert finetune(tiny, tmp_path / "a", "--report-to", "wandb") == 2
    assert "pip install wandb" in errors(capsys)[0]
    assert finetune(tiny, tmp_path / "b", "--fp16") == 2
    assert "--fp16 needs a CUDA device" in errors(capsys)[0]
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    assert finetune(tiny, tmp_path / "c", "--push-to-hub") == 2
    assert "HF_HUB_OFFLINE" in errors(capsys)[0]
    assert not any((tmp_path / name).exists() for name in "abc")


def test_push_to_hub_uploads_the_adapter_and_its_sidecar(tiny, tmp_path, monkeypatch):
    calls = []

    class FakeApi:
        def whoami(self):
            return {"name": "me"}

        def create_repo(self, repo_id, **kwargs):
            calls.append(("create", repo_id))
            return type("Url", (), {"repo_id": f"me/{repo_id}", "__str__": lambda s: f"https://hf.co/me/{repo_id}"})()

        def upload_folder(self, repo_id, folder_path, allow_patterns, **kwargs):
            from pathlib import Path

            calls.append(("upload", repo_id, sorted(p.name for p in Path(folder_path).iterdir()
                                                    if any(p.match(g) for g in allow_patterns))))

    monkeypatch.setattr("lora_one.recipes.hub.HfApi", FakeApi)
    monkeypatch.setattr("lora_one.recipes.hub.constants.HF_HUB_OFFLINE", False)
    assert finetune(tiny, tmp_path / "my-adapter", "--push-to-hub") == 0
    assert calls == [("create", "my-adapter"), ("upload", "me/my-adapter",
                                                 ["README.md", "adapter_config.json", "adapter_model.safetensors",
                                                  "lora_one.json"])]
