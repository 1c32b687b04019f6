"""The write rules of `lora_one.core.files` and every writer that follows them: nothing we did not write is
deleted, outputs appear atomically, a crash leaves the old state."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch
from conftest import lm_batches, tiny_llama
from numerics import assert_same_outputs
from peft import LoraConfig, PeftModel
from tiny_models import one_thread, question_records, write_jsonl  # noqa: F401
from tiny_models import tiny_llama as tiny_llama_folder
from transformers import AutoModelForCausalLM, PreTrainedModel

from lora_one import get_lora_one_model, save_adapter
from lora_one.cli import main
from lora_one.core import files
from lora_one.core.errors import UsageError
from lora_one.core.files import ADAPTER, MODEL, check_out_folder, remove_ours, staged_folder, write_text_atomic


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (hidden ones too) with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def failing_replace(monkeypatch, when):
    """Make the first `os.replace` onto a destination that `when(dst)` accepts raise, as an I/O error would."""
    real, failed = os.replace, []

    def replace(src, dst):
        if not failed and when(Path(dst)):
            failed.append(dst)
            raise OSError(5, "Input/output error")
        return real(src, dst)

    monkeypatch.setattr(files.os, "replace", replace)


def write_folder(folder: Path, content: dict[str, str]) -> None:
    for name, text in content.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)


# ---------------------------------------------------------------- the rules themselves


def test_atomic_file_replaces_whole_or_not_at_all(tmp_path, monkeypatch):
    path = tmp_path / "sub" / "eval.json"
    write_text_atomic(path, "old\n")
    assert path.read_text() == "old\n"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask  # an ordinary file, not mkstemp's 0600
    failing_replace(monkeypatch, lambda dst: dst == path)
    with pytest.raises(OSError, match="Input/output"):
        write_text_atomic(path, "new\n")
    assert tree(tmp_path / "sub") == {"eval.json": b"old\n"}  # old content, no temporary file left
    with pytest.raises(UsageError, match="is a folder"):
        write_text_atomic(tmp_path / "sub", "x")


def test_new_folder_is_renamed_into_place(tmp_path):
    out = tmp_path / "a" / "adapter"
    with staged_folder(out, ADAPTER) as tmp:
        assert tmp.parent == out.parent and not out.exists()
        write_folder(tmp, {"adapter_config.json": "{}", "adapter_model.safetensors": "w"})
    assert tree(out) == {"adapter_config.json": b"{}", "adapter_model.safetensors": b"w"}
    assert sorted(p.name for p in out.parent.iterdir()) == ["adapter"]  # no temporary folder left


def test_existing_folder_keeps_foreign_files_and_loses_our_stale_shards(tmp_path):
    out = tmp_path / "merged"
    old = {"config.json": "old config", "model.safetensors.index.json": "old index",
           **{f"model-0000{k}-of-00003.safetensors": f"old shard {k}" for k in (1, 2, 3)},
           "tokenizer.json": "old tok", "README.md": "user notes", "notes.txt": "user",
           "model-final.safetensors": "user weights", "data/model.safetensors": "user, in a subfolder"}
    write_folder(out, old)
    with staged_folder(out, MODEL) as tmp:
        write_folder(tmp, {"config.json": "new config", "model.safetensors": "new weights", "tokenizer.json": "new tok",
                           "README.md": "our card"})
    assert tree(out) == {
        "config.json": b"new config", "model.safetensors": b"new weights", "tokenizer.json": b"new tok",
        "README.md": b"user notes", "notes.txt": b"user", "model-final.safetensors": b"user weights",
        "data/model.safetensors": b"user, in a subfolder",
    }
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def test_marker_leaves_first_and_arrives_last(tmp_path, monkeypatch):
    out = tmp_path / "adapter"
    write_folder(out, {"adapter_config.json": "old", "adapter_model.bin": "old w", "lora_one.json": "old"})
    moves = []
    real = os.replace
    monkeypatch.setattr(files.os, "replace", lambda src, dst: (moves.append((Path(src), Path(dst))), real(src, dst)))
    with staged_folder(out, ADAPTER) as tmp:
        write_folder(tmp, {"lora_one.json": "new", "adapter_model.safetensors": "new w", "adapter_config.json": "new"})
    away = [s.name for s, d in moves if s.parent == out]
    into = [d.name for s, d in moves if d.parent == out]
    assert away[0] == "adapter_config.json" and sorted(away) == ["adapter_config.json", "adapter_model.bin", "lora_one.json"]
    assert into[-1] == "adapter_config.json" and len(into) == 3
    assert tree(out) == {"adapter_config.json": b"new", "adapter_model.safetensors": b"new w", "lora_one.json": b"new"}


@pytest.mark.parametrize("fail_on", ["adapter_model.safetensors", "adapter_config.json"])
def test_a_failure_while_publishing_restores_the_old_folder(tmp_path, monkeypatch, fail_on):
    out = tmp_path / "adapter"
    write_folder(out, {"adapter_config.json": "old", "adapter_model.bin": "old w", "lora_one.json": "old", "mine.txt": "u"})
    before = tree(out)
    failing_replace(monkeypatch, lambda dst: dst == out / fail_on)
    with pytest.raises(OSError, match="Input/output"), staged_folder(out, ADAPTER) as tmp:
        write_folder(tmp, {"lora_one.json": "new", "adapter_model.safetensors": "new w", "adapter_config.json": "new"})
    assert tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no temporary or set-aside folder


def test_refused_out_folders(tmp_path, monkeypatch):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "file.txt").write_text("user")
    monkeypatch.chdir(tmp_path / "a" / "b")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    refused = {str(tmp_path / "file.txt"): "is a file", "/": "root folder", "..": "above the working folder",
               str(tmp_path): "above the working folder", "../b/..": "above the working folder",
               str(tmp_path / "home"): "home folder"}
    for path, message in refused.items():
        with pytest.raises(UsageError, match=message) as info:
            check_out_folder(path)
        assert "\n" not in str(info.value)
    assert check_out_folder(".") == tmp_path / "a" / "b"  # the working folder itself is fine
    assert check_out_folder("c/../d") == tmp_path / "a" / "b" / "d"
    assert (tmp_path / "file.txt").read_text() == "user"


def test_remove_ours_removes_only_matching_files(tmp_path):
    write_folder(tmp_path, {"adapter_config.json": "", "ckpt/step-01.pt": "", "ckpt/keep.txt": "", "a.txt": "",
                            "empty/step-01.pt": ""})
    (tmp_path / "step-dir.pt").mkdir()
    remove_ours(tmp_path, ("adapter_config.json", "ckpt/step-*.pt", "empty/step-*.pt", "step-*.pt"))
    assert sorted(tree(tmp_path)) == ["a.txt", "ckpt/keep.txt"]
    assert (tmp_path / "step-dir.pt").is_dir() and not (tmp_path / "empty").exists()


# ---------------------------------------------------------------- save_adapter


@pytest.fixture
def peft_model():
    config = LoraConfig(r=2, lora_alpha=4, use_rslora=True, target_modules=["q_proj", "v_proj"])
    return get_lora_one_model(tiny_llama(), config, lm_batches(8), show_progress_bar=False)


def user_files(folder: Path) -> dict[str, str]:
    content = {"notes.txt": "mine", "README.md": "my own readme", "results/table.csv": "1,2", "model.safetensors": "x"}
    write_folder(folder, content)
    return {k: v.encode() for k, v in content.items()}


def assert_loads_as(peft_model, folder):
    """Stock PEFT on an untouched base reproduces the model's logits from the folder: the same base and
    the same adapter weights, read back bit for bit, so the same arithmetic."""
    x = torch.tensor([[3, 17, 5, 40, 11]])
    loaded = PeftModel.from_pretrained(tiny_llama(), str(folder)).eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=x).logits, peft_model.eval()(input_ids=x).logits)


def test_save_adapter_keeps_the_users_files(peft_model, tmp_path):
    out = tmp_path / "mine"
    mine = user_files(out)
    save_adapter(peft_model, out)
    got = tree(out)
    assert {k: got[k] for k in mine} == mine
    assert set(got) - set(mine) == {"adapter_config.json", "adapter_model.safetensors", "lora_one.json"}
    assert_loads_as(peft_model, out)


def test_save_adapter_into_the_working_folder(peft_model, tmp_path, monkeypatch):
    cwd = tmp_path / "work"
    mine = user_files(cwd)
    monkeypatch.chdir(cwd)
    save_adapter(peft_model, ".")
    got = tree(cwd)
    assert {k: got[k] for k in mine} == mine and "adapter_config.json" in got
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"]
    assert_loads_as(peft_model, cwd)


def test_save_adapter_refuses_a_file(peft_model, tmp_path):
    path = tmp_path / "adapter"
    path.write_text("not a folder")
    with pytest.raises(UsageError, match="is a file") as info:
        save_adapter(peft_model, path)
    assert "\n" not in str(info.value) and path.read_text() == "not a folder"


def test_a_crash_while_saving_leaves_the_old_adapter(peft_model, tmp_path, monkeypatch):
    out = tmp_path / "adapter"
    save_adapter(peft_model, out)
    (out / "notes.txt").write_text("mine")
    before = tree(out)
    with torch.no_grad():  # a later state of training
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.add_(1.0)

    def crash(*args, **kwargs):
        raise RuntimeError("killed while writing")

    monkeypatch.setattr(type(peft_model), "save_pretrained", crash)
    with pytest.raises(RuntimeError, match="killed"):
        save_adapter(peft_model, out)
    assert tree(out) == before
    monkeypatch.undo()
    failing_replace(monkeypatch, lambda dst: dst == out / "adapter_model.safetensors")
    with pytest.raises(OSError, match="Input/output"):
        save_adapter(peft_model, out)
    assert tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    monkeypatch.undo()
    save_adapter(peft_model, out)  # and the new state once nothing fails
    assert_loads_as(peft_model, out)
    assert (out / "notes.txt").read_text() == "mine"


# ---------------------------------------------------------------- the commands


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {"llama": str(tiny_llama_folder(root / "llama")),
            "qa": str(write_jsonl(root / "qa.jsonl", question_records(24, seed=0)))}


def finetune(tiny, out, *extra):
    return main(["finetune", "--model", tiny["llama"], "--data", tiny["qa"], "--out", str(out), "--rank", "2",
                 "--init-samples", "4", "--batch-size", "4", "--max-steps", "2", "--lr", "1e-2", "--quiet", *extra])


def one_error_line(capsys, message):
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in err, err


def test_commands_refuse_a_file_as_out(tiny, tmp_path, capsys):
    path = tmp_path / "file"
    path.write_text("user")
    assert finetune(tiny, path) == 2
    one_error_line(capsys, "is a file")
    assert main(["merge", "--model", tiny["llama"], "--adapter", str(tmp_path), "--out", str(path)]) == 2
    one_error_line(capsys, "is a file")
    assert main(["init", "--model", tiny["llama"], "--data", tiny["qa"], "--out", str(path), "--overwrite"]) == 2
    one_error_line(capsys, "is a file")
    assert path.read_text() == "user"


def test_finetune_overwrite_removes_only_the_old_runs_files(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    assert finetune(tiny, out, "--save-every", "1") == 0
    first = tree(out)
    assert "checkpoint-1/optimizer.pt" not in first and "checkpoint-2/optimizer.pt" in first
    write_folder(out, {"notes.txt": "mine", "README.md": "my readme", "adapter_model.bin": "a stale adapter"})
    assert finetune(tiny, out, "--overwrite", "--variant", "lora", "--max-steps", "1") == 0
    got = tree(out)
    assert got["notes.txt"] == b"mine" and got["README.md"] == b"my readme"
    assert "adapter_model.bin" not in got and not [n for n in got if n.startswith("checkpoint-2")]
    assert "checkpoint-1/trainer_state.json" in got
    assert json.loads(got["lora_one.json"])["variant"] == "lora"
    assert json.loads(got["args.json"])["max_steps"] == 1
    assert [json.loads(line)["step"] for line in got["metrics.jsonl"].decode().splitlines()] == [1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    # The Trainer deletes older checkpoint folders whole: one holding a file of the user's is refused first.
    write_folder(out, {"checkpoint-1/mine.txt": "mine"})
    assert finetune(tiny, out, "--overwrite") == 2
    one_error_line(capsys, "checkpoint-1/mine.txt")
    assert (out / "checkpoint-1" / "mine.txt").read_text() == "mine"


def test_merge_overwrite_leaves_no_stale_shard(tiny, tmp_path, monkeypatch):
    run, merged = tmp_path / "run", tmp_path / "merged"
    assert finetune(tiny, run) == 0
    real = PreTrainedModel.save_pretrained
    monkeypatch.setattr(PreTrainedModel, "save_pretrained",
                        lambda self, d, **kw: real(self, d, **{**kw, "max_shard_size": "20KB"}))
    assert main(["merge", "--model", tiny["llama"], "--adapter", str(run), "--out", str(merged)]) == 0
    shards = sorted(p.name for p in merged.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and (merged / "model.safetensors.index.json").is_file()
    (merged / "notes.txt").write_text("mine")
    monkeypatch.undo()
    assert main(["merge", "--model", tiny["llama"], "--adapter", str(run), "--out", str(merged), "--overwrite"]) == 0
    names = sorted(p.name for p in merged.iterdir())
    assert not [n for n in names if n.startswith("model-") or n.endswith(".index.json")], names
    assert "model.safetensors" in names and (merged / "notes.txt").read_text() == "mine"
    x = torch.tensor([[5, 9, 12, 7, 30, 4]])
    with torch.no_grad():
        want = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny["llama"]), str(run)).eval()(input_ids=x)
        plain = AutoModelForCausalLM.from_pretrained(merged).eval()
        got = plain(input_ids=x)
    assert_same_outputs(got.logits, want.logits, plain, x.shape[1])  # merged weights: other arithmetic


def test_a_crash_while_merging_leaves_the_old_model(tiny, tmp_path, monkeypatch):
    run, merged = tmp_path / "run", tmp_path / "merged"
    assert finetune(tiny, run) == 0
    assert main(["merge", "--model", tiny["llama"], "--adapter", str(run), "--out", str(merged)]) == 0
    (merged / "notes.txt").write_text("mine")
    before = tree(merged)
    assert finetune(tiny, run, "--overwrite", "--variant", "lora") == 0  # another adapter to merge
    failing_replace(monkeypatch, lambda dst: dst == merged / "model.safetensors")
    with pytest.raises(OSError, match="Input/output"):
        main(["merge", "--model", tiny["llama"], "--adapter", str(run), "--out", str(merged), "--overwrite"])
    assert tree(merged) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged", "run"]


def test_eval_writes_its_json_atomically(tiny, tmp_path, monkeypatch):
    run = tmp_path / "run"
    assert finetune(tiny, run) == 0
    result = run / "eval.json"
    command = ["eval", "--model", tiny["llama"], "--adapter", str(run), "--data", tiny["qa"]]
    assert main(command) == 0
    before = result.read_bytes()
    assert json.loads(before)["n"] == 24
    failing_replace(monkeypatch, lambda dst: dst == result)
    with pytest.raises(OSError, match="Input/output"):
        main(command)
    assert result.read_bytes() == before and not [p for p in run.iterdir() if p.name.startswith(".")]


def test_finetune_overwrite_refuses_a_folder_that_holds_no_run(tiny, tmp_path, capsys):
    """--overwrite deletes an earlier run's files by name; in a folder that never held a run, files of the
    same names are the user's, so nothing is deleted and the run is refused."""
    out = tmp_path / "mine"
    write_folder(out, {"metrics.jsonl": "my metrics", "loss.png": "my plot"})
    assert finetune(tiny, out, "--overwrite") == 2
    assert "no lora-one run" in capsys.readouterr().err
    assert tree(out) == {"metrics.jsonl": b"my metrics", "loss.png": b"my plot"}
