"""The one-step gradient and the init on the real packaged models (SmolLM2-135M, all-MiniLM-L6)."""

import pytest
import torch
from conftest import full_finetuning_gradients
from peft import LoraConfig, PeftModel
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from lora_one import estimate_gradients, get_lora_one_model, save_adapter
from lora_one.data import causal_lm_features, collate
from lora_one.embedded_data import load

pytestmark = pytest.mark.slow


def test_smollm2_gradient_matches_full_backward_and_round_trips(smollm2_dir, tmp_path):
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    feats = causal_lm_features(load("trec:train")[:2], tok, max_length=64)
    batches = [collate([f], tok.pad_token_id or 0) for f in feats]
    targets = ["q_proj", "down_proj"]
    grads = estimate_gradients(model, batches, target_modules=targets, progress=False, num_samples=2)
    assert len(grads) == 2 * model.config.num_hidden_layers
    reference = full_finetuning_gradients(model, batches)
    for name, g in grads.items():
        torch.testing.assert_close(g, reference[name], rtol=1e-4, atol=1e-7)
    del reference

    peft_model = get_lora_one_model(model, LoraConfig(r=8, lora_alpha=16, use_rslora=True, target_modules=targets),
                                    batches, progress=False, num_samples=2)
    with torch.no_grad():
        expected = peft_model(**batches[0]).logits
    save_adapter(peft_model, tmp_path / "adapter")
    fresh = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    loaded = PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batches[0]).logits, expected, rtol=0, atol=1e-5)


def test_minilm_gradient_matches_full_backward(minilm_dir):
    tok = AutoTokenizer.from_pretrained(minilm_dir)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(minilm_dir, num_labels=2).eval()
    records = load("sentiment:train")[:4]
    enc = tok([r["text"] for r in records], padding=True, truncation=True, max_length=64, return_tensors="pt")
    labels = torch.tensor([int(r["label"] == "positive") for r in records])
    batches = [{**{k: v[i : i + 2] for k, v in enc.items()}, "labels": labels[i : i + 2]} for i in (0, 2)]
    grads = estimate_gradients(model, batches, progress=False, num_samples=4)
    assert "classifier" not in grads and len(grads) == 6 * 6 + 1  # 6 Linear per layer + pooler
    reference = full_finetuning_gradients(model, batches, "classification")  # padded rows taken apart
    for name, g in grads.items():
        torch.testing.assert_close(g, reference[name], rtol=1e-4, atol=1e-7)
