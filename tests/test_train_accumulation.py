"""Gradient accumulation in the training loop follows the gradient convention of the init: one
optimizer step is one full-batch gradient over all loss terms of its micro-batches."""

import copy

from conftest import ragged_examples, tiny_llama
from peft import LoraConfig, get_peft_model
from torch.optim.optimizer import register_optimizer_step_pre_hook

from lora_one.train import TrainSettings, train

FEATURES = [{k: v.tolist() for k, v in e.items()} for e in ragged_examples()]  # 5, 9, 14, 7 tokens


def step_gradients(model, settings, out):
    """The gradients the optimizer sees at its first step (no clipping), and the logged loss."""
    names = {id(p): n for n, p in model.named_parameters()}
    seen = {}

    def grab(optimizer, args, kwargs):
        seen.update({names[id(p)]: p.grad.clone() for g in optimizer.param_groups for p in g["params"]})

    handle = register_optimizer_step_pre_hook(grab)
    try:
        result = train(model, FEATURES, pad_id=0, settings=settings, out_dir=out)
    finally:
        handle.remove()
    return seen, result.metrics[-1]["train_loss"]


def test_grad_accum_step_equals_one_batch_of_both(tmp_path):
    """Two micro-batches of 2 ragged examples (grad_accum=2) give the gradient and loss of one
    micro-batch of all 4: each micro-batch's mean loss weighs by its share of the step's label
    tokens, not 1/grad_accum (which was 20 to 31% off here, per LoRA factor)."""
    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    common = {"lr": 1e-3, "max_steps": 1, "warmup_steps": 0, "warmup_ratio": 0.0, "max_grad_norm": 0.0,
              "progress": False}
    accumulated, loss_2 = step_gradients(copy.deepcopy(model), TrainSettings(batch_size=2, grad_accum=2, **common),
                                         tmp_path / "a")
    whole, loss_1 = step_gradients(copy.deepcopy(model), TrainSettings(batch_size=4, grad_accum=1, **common),
                                   tmp_path / "b")
    assert accumulated.keys() == whole.keys() and len(whole) == 8
    for name, g in whole.items():
        rel = float((accumulated[name] - g).norm() / g.norm())
        assert rel < 1e-5, (name, rel)
    assert abs(loss_2 - loss_1) < 1e-6 * loss_1
