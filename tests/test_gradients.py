"""estimate_gradients against an independent plain full fine-tuning backward."""

import copy

import pytest
import torch
from conftest import cls_batches, full_finetuning_gradients, lm_batches, tiny_bert, tiny_llama
from peft import LoraConfig, get_peft_model

from lora_one import estimate_gradients


def snapshot(model):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        {n: p.requires_grad for n, p in model.named_parameters()},
        {n: m.training for n, m in model.named_modules()},
    )


def assert_unchanged(model, snap):
    state, flags, modes = snap
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize(
    "make, batches, n_targets",
    [(tiny_llama, lm_batches(n=4), 14), (tiny_bert, cls_batches(n=6, batch_size=2), 13)],
)
def test_matches_full_finetuning_backward(make, batches, n_targets):
    model = make()
    model.train()  # the estimate must switch dropout off and restore train mode
    snap = snapshot(model)
    grads = estimate_gradients(model, batches, progress=False)
    assert_unchanged(model, snap)
    reference = full_finetuning_gradients(model, batches)
    assert len(grads) == n_targets  # all-linear: every Linear but the LM head / classifier
    assert "lm_head" not in grads and "classifier" not in grads
    for name, g in grads.items():
        assert g.dtype == torch.float32 and g.shape == reference[name].shape
        torch.testing.assert_close(g, reference[name], rtol=1e-5, atol=1e-8)


def test_target_modules_and_pending_grad_untouched(llama):
    batches = lm_batches()
    w = llama.model.layers[0].self_attn.q_proj.weight
    w.grad = torch.full_like(w, 7.0)  # a user's pending gradient must neither leak in nor vanish
    grads = estimate_gradients(llama, batches, target_modules=["q_proj", "v_proj"], progress=False)
    assert sorted(grads) == sorted(f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj"))
    assert torch.equal(w.grad, torch.full_like(w, 7.0))
    w.grad = None
    reference = full_finetuning_gradients(llama, batches)
    torch.testing.assert_close(grads["model.layers.0.self_attn.q_proj"], reference["model.layers.0.self_attn.q_proj"])


def test_peft_model_gives_base_layer_gradients(llama):
    batches = lm_batches()
    plain = estimate_gradients(llama, batches, progress=False)
    peft_model = get_peft_model(copy.deepcopy(llama), LoraConfig(r=2, target_modules="all-linear"))
    snap = snapshot(peft_model)
    wrapped = estimate_gradients(peft_model, batches, progress=False)
    assert_unchanged(peft_model, snap)
    assert sorted(wrapped) == sorted(plain)
    for name in plain:
        torch.testing.assert_close(wrapped[name], plain[name], rtol=1e-5, atol=1e-8)


def test_no_batches(llama):
    with pytest.raises(ValueError, match="No batches"):
        estimate_gradients(llama, [], progress=False)


def test_batch_without_labels(llama):
    batch = {"input_ids": torch.zeros(1, 4, dtype=torch.long)}
    snap = snapshot(llama)
    with pytest.raises(ValueError, match="no 'labels'"):
        estimate_gradients(llama, [batch], progress=False)
    assert_unchanged(llama, snap)


def test_no_module_matches(llama):
    with pytest.raises(ValueError, match="No nn.Linear layer .* matches"):
        estimate_gradients(llama, lm_batches(), target_modules=["nonexistent_proj"], progress=False)


def test_layer_the_loss_never_reaches(llama):
    llama.model.unused = torch.nn.Linear(32, 32)
    with pytest.raises(ValueError, match="'model.unused' is exactly zero"):
        estimate_gradients(llama, lm_batches(), progress=False)


def test_inf_in_a_gradient(llama):
    def poison(module, grad_input, grad_output):
        return (torch.full_like(grad_input[0], float("inf")),)

    handle = llama.model.layers[1].mlp.register_full_backward_hook(poison)
    with pytest.raises(ValueError, match="contains NaN or Inf"):
        estimate_gradients(llama, lm_batches(), progress=False)
    handle.remove()


def test_nan_loss(llama):
    with torch.no_grad():
        llama.lm_head.weight[3, 0] = float("nan")
    with pytest.raises(ValueError, match="loss of batch 0 is nan"):
        estimate_gradients(llama, lm_batches(), progress=False)


def test_weight_that_cannot_take_a_gradient(llama):
    """A quantised weight: the error names the problem and the fix (sketch mode needs no weight grad)."""
    q = llama.model.layers[0].self_attn.q_proj
    q.weight = torch.nn.Parameter(q.weight.to(torch.int8), requires_grad=False)
    with pytest.raises(ValueError, match="cannot take a gradient") as info:
        estimate_gradients(llama, lm_batches(), progress=False)
    assert "Use mode='sketch'" in str(info.value)


def test_sharded_weights_are_refused(llama):
    """DeepSpeed ZeRO-3 marks its partitioned parameters with `ds_id`; their data is not the weight."""
    llama.model.layers[0].self_attn.q_proj.weight.ds_id = 0
    with pytest.raises(ValueError, match="sharded .FSDP or DeepSpeed ZeRO-3.") as info:
        estimate_gradients(llama, lm_batches(), progress=False, mode="sketch", rank=2)
    assert "torchrun/DDP" in str(info.value)


def test_batches_are_iterated_once_per_pass(llama):
    """A progress bar must not start a second iteration (a DataLoader would re-spawn its workers and
    draw its seed from the global RNG twice)."""

    class Counting:
        def __init__(self, batches):
            self.batches, self.iterations = batches, 0

        def __iter__(self):
            self.iterations += 1
            return iter(self.batches)

        def __len__(self):
            return len(self.batches)

    for mode, kwargs, passes in (("accumulate", {}, 1), ("sketch", {"rank": 2, "passes": 2}, 2)):
        batches = Counting(lm_batches())
        estimate_gradients(llama, batches, progress=True, mode=mode, **kwargs)
        assert batches.iterations == passes, mode
