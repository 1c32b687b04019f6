"""create_optimizer: PEFT's Riemannian preconditioner against the dense reference of ALGORITHM.md."""

import copy

import pytest
import torch
from conftest import lm_batches, tiny_llama
from numerics import U32, checked, relative_error, sum_tol
from peft import LoraConfig
from tiny_models import LORA

from lora_one import LoraOneConfig, create_optimizer, get_lora_one_model
from lora_one.linalg.preconditioner import precondition


def solve_tol(gram: torch.Tensor, n: int) -> float:
    """Relative (Frobenius) error of a float32 `(F^T F + reg I)^-1 g` (or `g (F F^T + reg I)^-1`), solved or
    inverted, against the float64 `gram`'s: the Gram's sums of `n` terms err by sum_tol(n) |F|^T |F|, at most
    r sum_tol(n) |gram|_2 (|F|_F^2 <= r |F|_2^2), the r x r solve (or inverse, then product) adds a backward
    error of sum_tol(r) twice, and reg I rounds once; all amplified by gram's condition number."""
    r = gram.shape[0]
    eps = r * sum_tol(n) + 2 * sum_tol(r) + U32
    kappa = float(torch.linalg.cond(gram))
    return checked(kappa * eps / (1 - kappa * eps) + U32)  # + the result's own rounding


def exact_precondition(A, B, gA, gB, reg):
    """`precondition` in float64, and the two Gram matrices."""
    eye = torch.eye(A.shape[0], dtype=torch.float64)
    A64, B64 = A.double(), B.double()
    gram_B, gram_A = B64.T @ B64 + reg * eye, A64 @ A64.T + reg * eye
    return torch.linalg.solve(gram_B, gA.double()), torch.linalg.solve(gram_A, gB.double().T).T, gram_B, gram_A


def test_dense_reference_formula():
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(3, 7, generator=g), torch.randn(5, 3, generator=g)
    gA, gB = torch.randn(3, 7, generator=g), torch.randn(5, 3, generator=g)
    reg = 0.1
    pA, pB = precondition(A, B, gA, gB, reg)
    want_A, want_B, gram_B, gram_A = exact_precondition(A, B, gA, gB, reg)
    assert relative_error(pA, want_A) <= solve_tol(gram_B, 5)
    assert relative_error(pB, want_B) <= solve_tol(gram_A, 7)


def test_negative_reg_is_refused():
    with pytest.raises(ValueError, match="reg must be >= 0"):
        precondition(torch.ones(2, 3), torch.ones(4, 2), torch.ones(2, 3), torch.ones(4, 2), -1.0)


def _pairs(model):
    params = dict(model.named_parameters())
    return [(n, n.replace(".lora_A.", ".lora_B.")) for n in params if ".lora_A." in n]


@pytest.mark.parametrize("reg", [1e-6, 1e-2])
def test_preconditioned_adamw_equals_adamw_on_preconditioned_gradients(reg):
    """Three steps of create_optimizer(precondition=True): at each step, the gradients it hands to AdamW are
    the reference preconditioning of the step's gradients, from the factors before the step (up to the
    round-off of an r x r solve: compared step by step, as AdamW, dividing each entry by its own magnitude,
    would amplify round-off without bound over a trajectory), and its parameters are plain AdamW's fed those
    gradients, bit for bit."""
    batches = lm_batches(n=3)
    model = get_lora_one_model(tiny_llama(), LoraConfig(**LORA), batches,
                               config=LoraOneConfig(gamma=16, init_samples=3))
    reference, plain = copy.deepcopy(model), copy.deepcopy(model)
    opt = create_optimizer(model, lr=1e-2, precondition=True, prec_reg=reg, weight_decay=0.0)
    plain_opt = create_optimizer(plain, lr=1e-2, precondition=False, weight_decay=0.0)
    ref_params = {n: p for n, p in reference.named_parameters() if p.requires_grad}
    ref_opt = torch.optim.AdamW(list(ref_params.values()), lr=1e-2, weight_decay=0.0)
    params = dict(model.named_parameters())
    for batch in batches:
        for m, o in ((model, opt), (plain, plain_opt)):
            o.zero_grad()
            m(**batch).loss.backward()
        before = {n: (p.detach().clone(), p.grad.clone()) for n, p in params.items() if p.requires_grad}
        opt.step()  # preconditions each pair's .grad in place, then steps AdamW
        plain_opt.step()
        for a_name, b_name in _pairs(model):
            (A, gA), (B, gB) = before[a_name], before[b_name]
            want_A, want_B, gram_B, gram_A = exact_precondition(A, B, gA, gB, reg)
            assert relative_error(params[a_name].grad, want_A) <= solve_tol(gram_B, B.shape[0]), a_name
            assert relative_error(params[b_name].grad, want_B) <= solve_tol(gram_A, A.shape[1]), b_name
        for n, p in ref_params.items():
            p.grad = params[n].grad.clone()
        ref_opt.step()
        for n, p in ref_params.items():  # the same AdamW arithmetic on the same gradients
            assert torch.equal(p, params[n]), n
    # and the preconditioner really changed the trajectory compared with plain AdamW
    gap = max(float((p - q).detach().abs().max())
              for p, q in zip(model.parameters(), plain.parameters()) if p.requires_grad)
    assert gap > 1e-3  # a tenth of an AdamW step (lr = 1e-2): a real change, far above round-off


def test_plain_adamw_and_bad_lr():
    model = get_lora_one_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]), None,
                               config=LoraOneConfig(variant="lora"))
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

    from lora_one.recipes.settings import FinetuneSettings

    model = get_lora_one_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]), None,
                               config=LoraOneConfig(variant="lora"))
    for preconditioned in (False, True):
        groups = create_optimizer(model, lr=1e-3, precondition=preconditioned).param_groups
        assert [g["weight_decay"] for g in groups] == [0.0] * len(groups)
        groups = create_optimizer(model, lr=1e-3, precondition=preconditioned, weight_decay=0.1).param_groups
        assert [g["weight_decay"] for g in groups] == [0.1] * len(groups)
    cli_default = FinetuneSettings(model="m", data="d", out="o").weight_decay
    assert cli_default == inspect.signature(create_optimizer).parameters["weight_decay"].default == 0.0
