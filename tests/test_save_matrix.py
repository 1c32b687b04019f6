"""Every variant saves, reloads and merges, on both tasks (issue 9, section 2).

Task (causal LM: tiny Llama; classification: tiny BERT whose head is trained) x all six variants:
init on ragged padded batches with a short last batch, a few AdamW steps that move every factor and
the head away from step 0, `save_adapter`, then
(a) stock `PeftModel.from_pretrained` on the untouched base gives the trained model's logits,
(b) `lora-one eval` on the saved adapter gives the loss the trained model gives (one plain forward
    with `labels`, i.e. transformers' own loss over all supervised tokens or examples),
(c) `lora-one merge` gives a plain model with the trained model's logits.
"""

from __future__ import annotations

import json

import pytest
import torch
from numerics import assert_same_outputs, output_tol
from peft import LoraConfig, PeftModel
from safetensors.torch import load_file
from tiny_models import one_thread, question_records, sentiment_records, tiny_bert, tiny_llama, write_jsonl  # noqa: F401
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from lora_one import LoraOneConfig, get_lora_one_model, save_adapter
from lora_one.cli import main
from lora_one.core.constants import BASE_CHANGING_VARIANTS, VARIANTS

RANK = 4
LABELS = {"negative": 0, "positive": 1}


def padded(rows: list[dict], pad_id: int) -> dict:
    """Right-pad `input_ids` (attention mask 0) and `labels` (-100) of rows of different lengths."""
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    labels = torch.full((len(rows), width), -100)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n], mask[i, :n], labels[i, :n] = torch.tensor(r["input_ids"]), 1, torch.tensor(r["labels"])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def causal_batch(tok, records) -> dict:
    """Prompt tokens, then the response's tokens and eos; only the response and eos are supervised."""
    rows = []
    for r in records:
        prompt = tok(r["prompt"])["input_ids"]
        response = tok(r["response"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        rows.append({"input_ids": prompt + response, "labels": [-100] * len(prompt) + response})
    return padded(rows, tok.pad_token_id)


def classification_batch(tok, records) -> dict:
    batch = dict(tok([r["text"] for r in records], padding=True, return_tensors="pt"))
    batch.pop("token_type_ids", None)
    return {**batch, "labels": torch.tensor([LABELS[r["label"]] for r in records])}


TASKS = {
    "causal": (tiny_llama, AutoModelForCausalLM, {}, question_records, causal_batch, "CAUSAL_LM"),
    "classification": (tiny_bert, AutoModelForSequenceClassification, {"num_labels": 2}, sentiment_records,
                       classification_batch, "SEQ_CLS"),
}


@pytest.fixture(scope="module", params=list(TASKS))
def task(request, tmp_path_factory):
    """One model folder and data set per task: 5 init/training records (batches of 3, then 2) and 7
    eval records, all of different lengths."""
    make_model, auto, kwargs, records, make_batch, task_type = TASKS[request.param]
    root = tmp_path_factory.mktemp(request.param)
    folder = make_model(root / "model")
    tok = AutoTokenizer.from_pretrained(folder)
    train, held_out = records(5, seed=3), records(7, seed=4)
    return {
        "name": request.param, "folder": folder, "task_type": task_type,
        "base": lambda: auto.from_pretrained(folder, **kwargs).eval(),
        "auto": auto,
        "batches": [make_batch(tok, train[:3]), make_batch(tok, train[3:])],
        "eval_batch": make_batch(tok, held_out),
        "eval_file": write_jsonl(root / "eval.jsonl", held_out),
    }


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("variant", VARIANTS)
def test_save_reload_eval_merge(task, variant, tmp_path):
    config = LoraConfig(r=RANK, lora_alpha=8, use_rslora=True, target_modules="all-linear",
                        task_type=task["task_type"])
    model = get_lora_one_model(task["base"](), config, task["batches"], show_progress_bar=False,
                               config=LoraOneConfig(variant=variant, gamma=16, init_samples=None))
    step0 = trainable(model)
    if task["name"] == "classification":
        assert any("classifier.modules_to_save" in n for n in step0)  # the head is trained
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    for step in range(3):
        opt.zero_grad()
        model(**task["batches"][step % 2]).loss.backward()
        opt.step()
    model.eval()
    moved = trainable(model)
    assert all(not torch.equal(moved[n], step0[n]) for n in step0), "every factor and the head moved"
    want = logits(model, task["eval_batch"])
    with torch.no_grad():
        want_loss = model(**task["eval_batch"]).loss.item()

    out = tmp_path / "adapter"
    extra = {"task": "causal-lm" if task["name"] == "causal" else "classification", "label2id": LABELS}
    save_adapter(model, out, extra=extra)
    saved = json.loads((out / "adapter_config.json").read_text())
    converted = variant in BASE_CHANGING_VARIANTS
    assert saved["r"] == (2 * RANK if converted else RANK)
    if task["name"] == "classification":
        assert any(".classifier." in k for k in load_file(out / "adapter_model.safetensors"))

    # (a) stock PEFT on the untouched base
    loaded = PeftModel.from_pretrained(task["base"](), out).eval()
    positions = task["eval_batch"]["input_ids"].shape[1]
    if converted:  # the original base with a rank-2r adapter against the residual base with the rank-r one
        assert_same_outputs(logits(loaded, task["eval_batch"]), want, loaded, positions)
    else:  # the same base, the same adapter read back bit for bit: the same arithmetic
        assert torch.equal(logits(loaded, task["eval_batch"]), want)

    # (b) lora-one eval: batches of 3 over 7 records, so a short last batch
    result = tmp_path / "eval.json"
    assert main(["eval", "--model", str(task["folder"]), "--adapter", str(out), "--data", str(task["eval_file"]),
                 "--batch-size", "3", "--out", str(result)]) == 0
    labels = task["eval_batch"]["labels"]
    terms = int((labels != -100).sum())  # supervised tokens, or examples
    # other batches (of 3) and padding, maybe other weights: two float32 losses, each within output_tol
    got_loss = json.loads(result.read_text())["loss"]
    assert got_loss == pytest.approx(want_loss, rel=2 * output_tol(model, positions, terms))

    # (c) lora-one merge
    merged = tmp_path / "merged"
    assert main(["merge", "--model", str(task["folder"]), "--adapter", str(out), "--out", str(merged)]) == 0
    plain = task["auto"].from_pretrained(merged).eval()
    assert_same_outputs(logits(plain, task["eval_batch"]), want, plain, positions)  # merged weights: other arithmetic
