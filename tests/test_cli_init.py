"""`lora-one init` end to end on tiny saved models, and its bad-input errors."""

import json

import pytest
import torch
from conftest import full_finetuning_gradients
from numerics import assert_close_products, gradient_tol, products
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from lora_one import LoraOneConfig
from lora_one.cli import main
from lora_one.cli.init import print_layer_table
from lora_one.recipes.data import init_sample_indices, prepare


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


LM_ROWS = [{"prompt": f"Question {i}: what is {i} plus {i}?", "response": f" {2 * i}"} for i in range(10)]
CLS_ROWS = [{"text": f"sample text number {i}", "label": ["pos", "neg"][i % 2]} for i in range(6)]


def write_text(path, text):
    path.write_text(text)
    return path


def run(*args):
    return main([str(a) for a in args])


def test_init_causal_lm(tiny_llama_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", LM_ROWS)
    out = tmp_path / "init"
    assert run("init", "--model", tiny_llama_dir, "--data", data, "--out", out, "--rank", 4,
               "--init-samples", 4, "--init-batch-size", 2, "--max-length", 32) == 0
    printed = capsys.readouterr().out
    assert "model.layers.1.mlp.down_proj" in printed and "gradient phase" in printed and "SVD phase" in printed
    meta = json.loads((out / "lora_one.json").read_text())
    assert meta["init_samples"] == 4 and meta["init_batches"] == 2 and meta["variant"] == "lora-one"
    # the settings as the library takes them: the flags' LoraOneConfig, which reads back from the sidecar
    assert LoraOneConfig(**meta["config"]) == LoraOneConfig(init_samples=4)
    assert len(meta["layers"]) == 14 and all(layer["sigma_1"] > 0 for layer in meta["layers"])
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    loaded = PeftModel.from_pretrained(base, out)
    assert sum(p.numel() for n, p in loaded.named_parameters() if "lora_" in n) > 0


def test_init_classification_csv(tiny_bert_dir, tmp_path):
    data = tmp_path / "train.csv"
    data.write_text("text,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in CLS_ROWS))
    out = tmp_path / "cls"
    assert run("init", "--model", tiny_bert_dir, "--data", data, "--out", out, "--rank", 2, "--init-samples", 4) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["init_lora_weights"] is True
    assert "classifier" in str(config["modules_to_save"])


def test_same_seed_same_adapter_from_cli(tiny_llama_dir, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", LM_ROWS)
    for name in ("a", "b"):
        assert run("init", "--model", tiny_llama_dir, "--data", data, "--out", tmp_path / name,
                   "--rank", 2, "--init-samples", 3, "--seed", 5) == 0
    a = (tmp_path / "a" / "adapter_model.safetensors").read_bytes()
    assert a == (tmp_path / "b" / "adapter_model.safetensors").read_bytes()


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda d: {"--model": "no-such-model"}, "neither an alias"),
        (lambda d: {"--data": d / "missing.jsonl"}, "does not exist"),
        (lambda d: {"--data": write_jsonl(d / "empty.jsonl", [])}, "holds no records"),
        (lambda d: {"--data": write_jsonl(d / "bad.jsonl", [{"question": "x", "answer": "y"}])},
         r"lacks field\(s\) \['prompt', 'response'\]"),
        (lambda d: {"--data": write_text(d / "t.parquet", "PAR1")}, "Cannot read"),  # a damaged Parquet file
        (lambda d: {"--data": write_text(d / "t.txt", "prompt: a")}, ".txt"),
        (lambda d: {"--data": write_text(d / "broken.jsonl", '{"prompt": "a",\n')}, "Cannot parse"),
        (lambda d: {"--rank": "100"}, "larger than the smallest dimension"),
        (lambda d: {"--init-samples": "50"}, "exceeds the 10 training records"),
        (lambda d: {"--target": "nope_proj"}, "No nn.Linear layer"),
    ],
)
def test_bad_input_gives_one_clear_line_and_no_output(setup, message, tiny_llama_dir, tmp_path, capsys):
    args = {"--model": tiny_llama_dir, "--data": write_jsonl(tmp_path / "train.jsonl", LM_ROWS),
            "--out": tmp_path / "out", "--rank": "2"}
    args.update(setup(tmp_path))
    assert run("init", *[x for kv in args.items() for x in kv]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err
    assert __import__("re").search(message, err), err
    assert not (tmp_path / "out").exists()


def test_existing_out_needs_overwrite(tiny_llama_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", LM_ROWS)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert run("init", "--model", tiny_llama_dir, "--data", data, "--out", out, "--rank", 2) == 2
    assert "--overwrite" in capsys.readouterr().err and (out / "keep.txt").exists()
    assert run("init", "--model", tiny_llama_dir, "--data", data, "--out", out, "--rank", 2, "--overwrite") == 0
    # --overwrite replaces our files only: the user's file stays (issue 9: never delete what we did not write)
    assert (out / "lora_one.json").exists() and (out / "keep.txt").read_text() == "mine"


def test_init_leaves_no_half_written_folder_on_failure(tiny_llama_dir, tmp_path, monkeypatch):
    """A failure while saving leaves neither --out nor a temporary sibling behind."""
    import lora_one.core.save

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(lora_one.core.save.PeftModel, "save_pretrained", boom)
    data = write_jsonl(tmp_path / "train.jsonl", LM_ROWS)
    with pytest.raises(OSError, match="disk full"):
        run("init", "--model", tiny_llama_dir, "--data", data, "--out", tmp_path / "out", "--rank", 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.jsonl"]


def test_init_sketch_passes_from_cli(tiny_llama_dir, tmp_path, capsys, monkeypatch):
    """`--grad-mode sketch --sketch-passes 3` reaches `estimate_gradients`, is recorded, and (with sketches
    as wide as each layer, so exact but for round-off) gives the accumulate-mode adapter."""
    from safetensors.torch import load_file

    import lora_one.core.init

    calls, real = [], lora_one.core.init.estimate_gradients

    def wide(*args, **kwargs):
        calls.append({k: kwargs.get(k) for k in ("grad_mode", "sketch_passes")})
        return real(*args, **{**kwargs, "oversample": 64} if kwargs.get("grad_mode") == "sketch" else kwargs)

    monkeypatch.setattr(lora_one.core.init, "estimate_gradients", wide)
    data = write_jsonl(tmp_path / "train.jsonl", LM_ROWS)
    common = ("--model", tiny_llama_dir, "--data", data, "--rank", 2, "--init-samples", 4, "--max-length", 32)
    assert run("init", *common, "--out", tmp_path / "exact") == 0
    assert run("init", *common, "--out", tmp_path / "sketch", "--grad-mode", "sketch", "--sketch-passes", 3) == 0
    assert calls[-1] == {"grad_mode": "sketch", "sketch_passes": 3} and calls[0]["grad_mode"] == "accumulate"
    meta = json.loads((tmp_path / "sketch" / "lora_one.json").read_text())
    assert meta["grad_mode"] == "sketch" and meta["sketch_passes"] == 3
    # Both adapters are the top-2 step of a float32 gradient of the same samples, within `gradient_tol` of the
    # float64 reference (orthonormal test matrices after the first pass: no amplification).
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    feats = prepare(LM_ROWS, AutoTokenizer.from_pretrained(tiny_llama_dir), "causal-lm", max_length=32)
    drawn = init_sample_indices(len(feats), 4, meta["seed"])  # as the init drew them
    examples = [{k: torch.tensor(feats[i][k]) for k in ("input_ids", "labels")} for i in drawn]
    reference = full_finetuning_gradients(model, examples)
    for folder in ("exact", "sketch"):
        got = products(load_file(tmp_path / folder / "adapter_model.safetensors"))
        assert_close_products(got, reference, 2, meta["gamma"], gradient_tol(model, examples))
    capsys.readouterr()
    assert run("init", *common, "--out", tmp_path / "bad", "--sketch-passes", 2) == 2
    assert "mode='sketch'" in capsys.readouterr().err


def test_layer_table_shows_a_missing_number_as_a_dash(capsys):
    """A quantised layer has no |W| (relative_update None), a PiSSA layer no gradient (sigma_1 None)."""
    print_layer_table([{"layer": "q", "shape": [4, 8], "sigma_1": None, "relative_update": None},
                       {"layer": "v", "shape": [4, 8], "sigma_1": 2.5, "relative_update": 0.0125}])
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    assert rows == [["q", "4x8", "-", "-"], ["v", "4x8", "2.500e+00", "1.250e-02"]]
