"""`--gamma auto|a,b,c` and `--grad-cache DIR` through `init` and `finetune` (and back from args.json)."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file
from tiny_models import one_thread, tiny_llama_and_questions  # noqa: F401 (fixtures: one_thread, tiny)

from lora_one.cli import main


def init(tiny, out, *extra):
    return main(["init", "--model", tiny["llama"], "--data", tiny["qa"], "--out", str(out), "--rank", "2",
                 "--init-samples", "4", *extra])


def sidecar(out):
    return json.loads((out / "lora_one.json").read_text())


def test_gamma_search_from_the_command_line_equals_the_fixed_gamma_it_chose(tiny, tmp_path, capsys):
    assert init(tiny, tmp_path / "auto", "--gamma", "16,64,256") == 0
    assert "gamma search on 4 held-out examples chose" in capsys.readouterr().out
    meta = sidecar(tmp_path / "auto")
    search = meta["gamma_search"]
    assert search["grid"] == [16, 64, 256] and meta["gamma"] == search["chosen"]
    assert meta["gamma"] == search["grid"][min(range(3), key=lambda i: search["losses"][i])]
    assert init(tiny, tmp_path / "fixed", "--gamma", str(meta["gamma"])) == 0
    a, b = (load_file(tmp_path / run / "adapter_model.safetensors") for run in ("auto", "fixed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bad_gamma_is_one_line(tiny, tmp_path, capsys):
    for extra, message in [(["--gamma", "fast"], "--gamma 'fast'"), (["--gamma", "-1"], "positive"),
                           (["--gamma", "auto", "--variant", "pissa"], "pissa")]:
        assert init(tiny, tmp_path / "x", *extra) == 2
        err = capsys.readouterr().err
        assert len([line for line in err.splitlines() if "error:" in line]) == 1 and message in err, err
        assert "Traceback" not in err
    assert not (tmp_path / "x").exists()
    # a search needs held-out records besides the init samples
    assert init(tiny, tmp_path / "x", "--gamma", "auto", "--init-samples", "13") == 2
    assert "besides the 13 init samples" in capsys.readouterr().err


def test_finetune_with_gamma_auto_and_a_gradient_cache_resumes_and_reuses(tiny, tmp_path, capsys):
    cache = tmp_path / "grads"
    args = ["finetune", "--model", tiny["llama"], "--data", tiny["qa"], "--eval-data", tiny["qa_eval"], "--rank", "2",
            "--init-samples", "4", "--batch-size", "4", "--max-steps", "2", "--quiet", "--gamma", "auto",
            "--grad-cache", str(cache)]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    first = sidecar(tmp_path / "a")
    assert first["gradient_cache"]["written"] and not first["gradient_cache"]["hit"]
    assert json.loads((tmp_path / "a" / "args.json").read_text())["gamma"] == "auto"
    # args.json loads back as a config; the finished run resumes to the same adapter
    assert main(["finetune", "--config", str(tmp_path / "a" / "args.json"), "--resume"]) == 0
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    assert "gradient cache hit" in capsys.readouterr().out
    second = sidecar(tmp_path / "b")
    assert second["gradient_cache"]["hit"] and second["gamma"] == first["gamma"]
    a, b = (load_file(tmp_path / run / "adapter_model.safetensors") for run in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)
