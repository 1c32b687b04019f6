"""Every data format and the seq2seq task through the command line: `finetune`, then `eval` of the
saved adapter (stock PEFT loading) reproducing the loss the run logged, and `merge` for seq2seq."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from numerics import assert_same_outputs
from peft import PeftModel
from tiny_models import one_thread  # noqa: F401
from transformers import (
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

from lora_one.cli import main

QUESTIONS = ["who wrote hamlet", "where is the louvre", "how many legs has a spider", "when did rome fall",
             "what is the boiling point of water in kelvin", "who painted the night watch", "why is the sky blue",
             "where do penguins live in the wild", "how far is the moon", "what is a prime number"]
TYPES = ["human", "location", "number", "number", "number", "human", "description", "location", "number",
         "description"]


@pytest.fixture(scope="module")
def models(tmp_path_factory, smollm2_dir):
    """A tiny T5 and a tiny Llama with SmolLM2's real tokenizer (and its chat template)."""
    root = tmp_path_factory.mktemp("models")
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    torch.manual_seed(0)
    T5ForConditionalGeneration(T5Config(
        vocab_size=len(tok), d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, dropout_rate=0.0,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, decoder_start_token_id=tok.pad_token_id,
        architectures=["T5ForConditionalGeneration"])).save_pretrained(root / "t5")
    LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, eos_token_id=tok.eos_token_id,
        architectures=["LlamaForCausalLM"])).save_pretrained(root / "llama")
    for name in ("t5", "llama"):
        tok.save_pretrained(root / name)
    return root


def write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def run(model, train, held_out, out, *extra):
    assert main(["finetune", "--model", str(model), "--data", str(train), "--eval-data", str(held_out), "--out",
                 str(out), "--rank", "2", "--init-samples", "4", "--batch-size", "4", "--grad-accum", "2",
                 "--max-steps", "3", "--lr", "1e-2", "--max-length", "64", "--quiet", *extra]) == 0
    return json.loads((out / "lora_one.json").read_text())


def evaluated(model, adapter, data, tmp_path):
    assert main(["eval", "--model", str(model), "--adapter", str(adapter), "--data", str(data),
                 "--out", str(tmp_path / "eval.json")]) == 0
    return json.loads((tmp_path / "eval.json").read_text())


def test_seq2seq_through_the_command_line(models, tmp_path):
    records = [{"prompt": f"classify: {q}", "response": t} for q, t in zip(QUESTIONS, TYPES)]
    train, held_out = write(tmp_path / "train.jsonl", records * 2), write(tmp_path / "val.jsonl", records[:6])
    meta = run(models / "t5", train, held_out, tmp_path / "run")
    assert meta["task"] == "seq2seq" and meta["choices"] == sorted(set(TYPES))
    assert json.loads((tmp_path / "run" / "adapter_config.json").read_text())["task_type"] == "SEQ_2_SEQ_LM"
    final = meta["training"]["final_eval"]
    got = evaluated(models / "t5", tmp_path / "run", held_out, tmp_path)
    # the run's evaluator on the same weights, in the same batches: the same arithmetic
    assert got["metric"] == "accuracy" and got["loss"] == final["eval_loss"]
    assert got["accuracy"] == final["eval_accuracy"]
    assert main(["merge", "--model", str(models / "t5"), "--adapter", str(tmp_path / "run"),
                 "--out", str(tmp_path / "merged")]) == 0
    x, y = torch.tensor([[5, 9, 12, 7, 2]]), torch.tensor([[0, 17, 4]])
    with torch.no_grad():
        base = AutoModelForSeq2SeqLM.from_pretrained(models / "t5")
        want = PeftModel.from_pretrained(base, str(tmp_path / "run")).eval()(input_ids=x, decoder_input_ids=y).logits
        merged = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "merged").eval()
        got = merged(input_ids=x, decoder_input_ids=y).logits
    assert_same_outputs(got, want, merged, x.shape[1] + y.shape[1])  # merged weights: other arithmetic


@pytest.mark.parametrize("fmt", ["messages", "text", "prompt-completion"])
def test_causal_lm_formats_through_the_command_line(models, tmp_path, fmt):
    if fmt == "messages":
        records = [{"messages": [{"role": "system", "content": "Answer with the question type."},
                                 {"role": "user", "content": q}, {"role": "assistant", "content": t}]}
                   for q, t in zip(QUESTIONS, TYPES)]
    elif fmt == "text":
        records = [{"text": f"{q}? It asks for a {t}."} for q, t in zip(QUESTIONS, TYPES)]
    else:
        records = [{"prompt": f"{q}? type:", "completion": f" {t}"} for q, t in zip(QUESTIONS, TYPES)]
    train = write(tmp_path / "train.jsonl", records * 2)
    if fmt == "text":  # and Parquet as the held-out file
        held_out = tmp_path / "val.parquet"
        pq.write_table(pa.Table.from_pylist(records[:6]), held_out)
    else:
        held_out = write(tmp_path / "val.jsonl", records[:6])
    meta = run(models / "llama", train, held_out, tmp_path / "run")
    assert meta["task"] == "causal-lm"
    final = meta["training"]["final_eval"]
    got = evaluated(models / "llama", tmp_path / "run", held_out, tmp_path)
    assert got["loss"] == final["eval_loss"]  # the run's evaluator on the same weights, in the same batches
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["step"] == 0 and final["eval_loss"] < metrics[0]["eval_loss"]  # it learned something
