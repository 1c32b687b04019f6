"""The one-step gradient and the init on the real packaged models (SmolLM2-135M, all-MiniLM-L6)."""

import pytest
import torch
from conftest import full_finetuning_gradients
from numerics import U32, checked, gradient_tol, relative_error
from peft import LoraConfig, PeftModel
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from lora_one import LoraOneConfig, estimate_gradients, get_lora_one_model, save_adapter
from lora_one.recipes.data import causal_lm_features, collate
from lora_one.recipes.embedded_data import load

pytestmark = pytest.mark.slow


def test_smollm2_gradient_matches_full_backward_and_round_trips(smollm2_dir, tmp_path):
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    feats = causal_lm_features(load("trec:train")[:2], tok, max_length=64)
    batches = [collate([f], tok.pad_token_id or 0) for f in feats]
    targets = ["q_proj", "down_proj"]
    grads = estimate_gradients(model, batches, target_modules=targets, show_progress_bar=False, init_samples=2)
    assert len(grads) == 2 * model.config.num_hidden_layers
    reference = full_finetuning_gradients(model, batches)  # float64
    # The output layer's input gradient is a sum over the vocabulary (49,152 terms an entry, one of them the -1 of
    # the label), which MKL's compatible code path (MKL_CBWR=COMPATIBLE) rounds with errors that do not cancel
    # (1.4e-4 relative, lambda sqrt(V) u, against 6e-7 in its default path): that link gets the worst-case bound
    # of a sum, (V - 1) u (Higham, Accuracy and Stability of Numerical Algorithms, ch. 4), on top of the chain's.
    tol = checked(gradient_tol(model, batches) + (model.config.vocab_size - 1) * U32)
    for name, g in grads.items():
        rel = relative_error(g, reference[name])
        assert rel <= tol, (name, rel, tol)
    del reference

    peft_model = get_lora_one_model(model, LoraConfig(r=8, lora_alpha=16, use_rslora=True, target_modules=targets),
                                    batches, config=LoraOneConfig(init_samples=2), show_progress_bar=False)
    with torch.no_grad():
        expected = peft_model(**batches[0]).logits
    save_adapter(peft_model, tmp_path / "adapter")
    fresh = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    loaded = PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
    with torch.no_grad():  # the same base, the same adapter read back bit for bit: the same arithmetic
        assert torch.equal(loaded(**batches[0]).logits, expected)


def test_minilm_gradient_matches_full_backward(minilm_dir):
    tok = AutoTokenizer.from_pretrained(minilm_dir)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(minilm_dir, num_labels=2).eval()
    records = load("sentiment:train")[:4]
    enc = tok([r["text"] for r in records], padding=True, truncation=True, max_length=64, return_tensors="pt")
    labels = torch.tensor([int(r["label"] == "positive") for r in records])
    batches = [{**{k: v[i : i + 2] for k, v in enc.items()}, "labels": labels[i : i + 2]} for i in (0, 2)]
    grads = estimate_gradients(model, batches, show_progress_bar=False, init_samples=4)
    assert "classifier" not in grads and len(grads) == 6 * 6 + 1  # 6 Linear per layer + pooler
    reference = full_finetuning_gradients(model, batches, "classification")  # padded rows taken apart; float64
    tol = gradient_tol(model, batches)
    for name, g in grads.items():
        rel = relative_error(g, reference[name])
        assert rel <= tol, (name, rel, tol)
