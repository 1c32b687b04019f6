"""create_optimizer: PEFT's Riemannian preconditioner against the dense reference of ALGORITHM.md."""

import copy

import pytest
import torch
from conftest import lm_batches, tiny_llama
from peft import LoraConfig
from tiny_models import LORA

from lora_one import create_optimizer, get_lora_one_model
from lora_one.preconditioner import precondition


def test_dense_reference_formula():
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(3, 7, generator=g), torch.randn(5, 3, generator=g)
    gA, gB = torch.randn(3, 7, generator=g), torch.randn(5, 3, generator=g)
    reg = 0.1
    pA, pB = precondition(A, B, gA, gB, reg)
    eye = torch.eye(3, dtype=torch.float64)
    A64, B64 = A.double(), B.double()
    torch.testing.assert_close(pA.double(), torch.inverse(B64.T @ B64 + reg * eye) @ gA.double())
    torch.testing.assert_close(pB.double(), gB.double() @ torch.inverse(A64 @ A64.T + reg * eye))


def test_negative_reg_is_refused():
    with pytest.raises(ValueError, match="reg must be >= 0"):
        precondition(torch.ones(2, 3), torch.ones(4, 2), torch.ones(2, 3), torch.ones(4, 2), -1.0)


def _pairs(model):
    params = dict(model.named_parameters())
    return [(n, n.replace(".lora_A.", ".lora_B.")) for n in params if ".lora_A." in n]


@pytest.mark.parametrize("reg", [1e-6, 1e-2])
def test_preconditioned_adamw_equals_adamw_on_preconditioned_gradients(reg):
    """Three steps of create_optimizer(precondition=True) == plain AdamW fed the reference-preconditioned
    gradients, computed from the factors before each step."""
    batches = lm_batches(n=3)
    model = get_lora_one_model(tiny_llama(), LoraConfig(**LORA), batches, gamma=16, num_samples=3)
    reference, plain = copy.deepcopy(model), copy.deepcopy(model)
    opt = create_optimizer(model, lr=1e-2, precondition=True, reg=reg, weight_decay=0.0)
    plain_opt = create_optimizer(plain, lr=1e-2, precondition=False, weight_decay=0.0)
    ref_params = [p for p in reference.parameters() if p.requires_grad]
    ref_opt = torch.optim.AdamW(ref_params, lr=1e-2, weight_decay=0.0)
    for batch in batches:
        for m, o in ((model, opt), (reference, ref_opt), (plain, plain_opt)):
            o.zero_grad()
            m(**batch).loss.backward()
        params = dict(reference.named_parameters())
        with torch.no_grad():
            for a_name, b_name in _pairs(reference):
                A, B = params[a_name], params[b_name]
                A.grad, B.grad = precondition(A, B, A.grad, B.grad, reg)
        opt.step()
        ref_opt.step()
        plain_opt.step()
    for (n, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=n)
    # and the preconditioner really changed the trajectory compared with plain AdamW
    gap = max(float((p - q).detach().abs().max())
              for p, q in zip(model.parameters(), plain.parameters()) if p.requires_grad)
    assert gap > 1e-3


def test_plain_adamw_and_bad_lr():
    model = get_lora_one_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]), None, variant="lora")
    opt = create_optimizer(model, lr=1e-3, weight_decay=0.0)
    assert type(opt) is torch.optim.AdamW
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == sum(
        p.numel() for p in model.parameters() if p.requires_grad
    )
    with pytest.raises(ValueError, match="learning rate must be positive"):
        create_optimizer(model, lr=0.0)


def test_weight_decay_has_one_default_zero():
    """No weight decay unless asked for, as in the authors' recipe and in `lora-one finetune` (torch's
    AdamW alone would decay by 0.01), with or without the preconditioner."""
    import inspect

    from lora_one.settings import FinetuneSettings

    model = get_lora_one_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]), None, variant="lora")
    for preconditioned in (False, True):
        groups = create_optimizer(model, lr=1e-3, precondition=preconditioned).param_groups
        assert [g["weight_decay"] for g in groups] == [0.0] * len(groups)
        groups = create_optimizer(model, lr=1e-3, precondition=preconditioned, weight_decay=0.1).param_groups
        assert [g["weight_decay"] for g in groups] == [0.1] * len(groups)
    cli_default = FinetuneSettings(model="m", data="d", out="o").weight_decay
    assert cli_default == inspect.signature(create_optimizer).parameters["weight_decay"].default == 0.0
