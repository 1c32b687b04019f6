"""Gradient accumulation in `finetune` (the Trainer's loop) follows the gradient convention of the
init: one optimizer step is one full-batch gradient over all loss terms of its micro-batches, also
when a micro-batch is short and for sequence classification (mean over examples)."""

import pytest
import torch
from numerics import gradient_tol, output_tol, relative_error
from tiny_models import one_thread, question_records, sentiment_records, tiny_bert, tiny_llama, write_jsonl  # noqa: F401
from torch.optim.optimizer import register_optimizer_step_pre_hook
from transformers import AutoConfig, AutoTokenizer

from lora_one.recipes.data import prepare
from lora_one.recipes.finetune import run_finetune
from lora_one.recipes.models import CAUSAL_LM, CLASSIFICATION
from lora_one.recipes.settings import FinetuneSettings


def first_step(settings: FinetuneSettings) -> tuple[list[torch.Tensor], float]:
    """The gradients the optimizer sees at its first step (no clipping), and the logged loss."""
    seen = []

    def grab(optimizer, args, kwargs):
        if not seen:
            seen.extend(p.grad.clone() for g in optimizer.param_groups for p in g["params"])

    handle = register_optimizer_step_pre_hook(grab)
    try:
        summary = run_finetune(settings)
    finally:
        handle.remove()
    return seen, summary["metrics"][0]["train_loss"]


@pytest.mark.parametrize("kind", ["causal", "classification"])
def test_grad_accum_step_equals_one_batch_of_all(tmp_path, kind):
    """Micro-batches of 3 and 2 ragged examples (grad_accum=2) give the gradient and loss of one
    micro-batch of all 5: each micro-batch weighs by its share of the step's loss terms (label tokens,
    or examples), not 1/grad_accum."""
    if kind == "causal":
        records, task = question_records(5, seed=2), CAUSAL_LM
        model, data = tiny_llama(tmp_path / "m"), write_jsonl(tmp_path / "d.jsonl", records)
    else:
        records, task = sentiment_records(5, seed=2), CLASSIFICATION
        model, data = tiny_bert(tmp_path / "m"), write_jsonl(tmp_path / "d.jsonl", records)
        config = AutoConfig.from_pretrained(model)  # dropout masks would differ with the batch shapes
        config.hidden_dropout_prob = config.attention_probs_dropout_prob = 0.0
        config.save_pretrained(model)
    common = dict(model=str(model), data=str(data), rank=2, init_samples=2, lr=1e-3, max_steps=1, warmup_ratio=0.0,
                  max_grad_norm=0.0, save_every=0, quiet=True, variant="lora-one")
    accumulated, loss_2 = first_step(FinetuneSettings(out=str(tmp_path / "a"), batch_size=3, grad_accum=2, **common))
    whole, loss_1 = first_step(FinetuneSettings(out=str(tmp_path / "b"), batch_size=5, grad_accum=1, **common))
    assert len(accumulated) == len(whole) > 0
    # two float32 computations of the same step by other batches: each within its bound of the exact one
    config = AutoConfig.from_pretrained(model)
    examples = [{k: torch.tensor(f[k]) for k in ("input_ids", "labels")}
                for f in prepare(records, AutoTokenizer.from_pretrained(model), task)]
    tol = 2 * gradient_tol(config, examples)
    for a, w in zip(accumulated, whole):
        rel = relative_error(a, w)
        assert rel <= tol, (rel, tol)
    positions = max(len(e["input_ids"]) for e in examples)
    terms = sum(int((e["labels"] != -100).sum()) for e in examples)  # label tokens, or examples
    assert loss_2 == pytest.approx(loss_1, rel=2 * output_tol(config, positions, terms))
