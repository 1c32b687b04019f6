"""recipes/curvature.py: the power-iteration top Hessian eigenvalue against the eigenvalues of the dense float64
Hessian, built independently (torch.autograd.functional.hessian of a loss written out by hand over the unpadded
examples); the micro-batch weighting; what is reported when the iteration does not converge."""

import pytest
import torch
import torch.nn.functional as F
from conftest import padded_batches, ragged_examples, tiny_llama
from numerics import U32, U64, checked, network_chain, sum_tol
from peft import LoraConfig, get_peft_model
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from lora_one.core.errors import UsageError
from lora_one.recipes.curvature import HessianOperator, top_hessian_eigenvalue

LENGTHS = (5, 9, 14, 7)
TOL = 1e-8  # the convergence criterion of the float64 checks: |Hv - λv| <= TOL |λ|


def _rms_norm_in_its_dtype(self, hidden_states):
    """LlamaRMSNorm without its round trip through float32 (the same arithmetic, in float64)."""
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


@pytest.fixture(scope="module", autouse=True)
def float64_throughout():
    """Llama's RMSNorm computes in float32 whatever its input: in a float64 model it would round every layer's
    output to float32, and the products to float32's precision. The tests here run it in float64. And on one
    thread: the products are a few thousand flops each, which threads only make wait on each other (on a busy
    CPU, forty times slower)."""
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(LlamaRMSNorm, "forward", _rms_norm_in_its_dtype)
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)


def adapter_model(b_scale: float = 0.3):
    """Tiny Llama in float64 with an r=2 LoRA on layer 0's q_proj and v_proj (2 (32 + 32) + 2 (32 + 16) = 224
    parameters), B drawn with a fixed seed, as after some training: a fresh LoRA (B = 0) has a Hessian whose A-B
    block is the gradient, with eigenvalue pairs near ±s·σ(G) that make power iteration slow."""
    model = tiny_llama().double()
    config = LoraConfig(r=2, lora_alpha=4, use_rslora=True, target_modules=["q_proj", "v_proj"],
                        layers_to_transform=[0], lora_dropout=0.0)
    torch.manual_seed(0)
    peft_model = get_peft_model(model, config)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(b_scale * torch.randn(p.shape, generator=g, dtype=torch.float64))
    return peft_model


def float64_loss(model, batch):
    """The batch's mean token cross-entropy in float64 (transformers' own loss upcasts the logits to
    float32 only): a causal LM predicts label t + 1 at position t."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100)


def dense_hessian(model, examples) -> torch.Tensor:
    """The reference: the Hessian of the loss summed over every label token of the unpadded `examples`
    divided by their number, with respect to the trainable parameters flattened in `parameters()` order,
    by torch.autograd.functional.hessian in float64."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    sizes = [p.numel() for _, p in named]

    def loss(flat):
        params = {n: x.view(p.shape) for (n, p), x in zip(named, flat.split(sizes))}
        total, count = 0.0, 0
        for e in examples:
            ids, labels = e["input_ids"][None], e["labels"][1:]
            logits = functional_call(model, params, args=(), kwargs={"input_ids": ids}).logits[0, :-1]
            keep = labels != -100
            total = total + F.cross_entropy(logits[keep], labels[keep], reduction="sum")
            count += int(keep.sum())
        return total / count

    flat = torch.cat([p.detach().reshape(-1) for _, p in named])
    with sdpa_kernel([SDPBackend.MATH]):
        H = torch.autograd.functional.hessian(loss, flat)
    return (H + H.mT) / 2  # symmetric to round-off; eigvalsh reads one triangle


def largest_magnitude(H: torch.Tensor) -> float:
    eig = torch.linalg.eigvalsh(H)
    return float(eig[eig.abs().argmax()])


def hessian_rel(model, dtype_u: float = U64) -> float:
    """Relative error of a Hessian-vector product (or a column of the reference) against exact arithmetic: the
    chain of a gradient (forward, backward, sum over the tokens) taken twice, for the derivative of the
    backward; a perturbation E of H moves every eigenvalue by at most |E|_2 <= |E|_F (Weyl)."""
    return sum_tol(2 * network_chain(model, sum(LENGTHS), max(LENGTHS)), dtype_u)


@pytest.fixture(scope="module")
def reference():
    model = adapter_model()
    H = dense_hessian(model, ragged_examples(LENGTHS))
    return model, H


def test_power_iteration_finds_the_largest_magnitude_eigenvalue(reference):
    model, H = reference
    assert H.shape == (224, 224)
    want = largest_magnitude(H)
    got = top_hessian_eigenvalue(model, padded_batches(ragged_examples(LENGTHS), 2), tol=TOL, max_iter=500, seed=0,
                                 train_step=float64_loss)
    assert got.converged and got.iterations < 500 and got.parameters == 224
    # an eigenvalue lies within the residual <= TOL |λ| of the Rayleigh quotient (Krylov-Weinstein), whatever the
    # gaps; the round-off of the products (iterate and reference alike) moves it by at most 2 rel |H|_F more
    bound = TOL * abs(got.eigenvalue) + 2 * hessian_rel(model) * float(H.norm())
    assert abs(got.eigenvalue - want) <= bound, (got, want, bound)
    assert checked(bound / abs(want)) > 0
    # |Hv| of a unit v: at least |<v, Hv>|, at most the spectral radius, to round-off (the float64 dot product
    # and norm over the 224 parameters each err by at most sum_tol of their length)
    assert abs(got.eigenvalue) <= got.norm * (1 + 2 * sum_tol(got.parameters, U64)) <= (abs(want) + bound) * (
        1 + 2 * sum_tol(got.parameters, U64))
    # the same seed, the same arithmetic: the same result
    again = top_hessian_eigenvalue(model, padded_batches(ragged_examples(LENGTHS), 2), tol=TOL, max_iter=500, seed=0,
                                   train_step=float64_loss)
    assert (again.eigenvalue, again.iterations) == (got.eigenvalue, got.iterations)


def test_the_models_own_loss_gives_the_same_eigenvalue(reference):
    """Without train_step: `model(**batch).loss`, which transformers computes from logits upcast to float32 (in a
    float64 model, float32 round-off enters at the loss: bounded by the float32 chain)."""
    model, H = reference
    want = largest_magnitude(H)
    got = top_hessian_eigenvalue(model, padded_batches(ragged_examples(LENGTHS), 2), tol=1e-6, max_iter=500, seed=0)
    assert got.converged
    bound = 1e-6 * abs(got.eigenvalue) + 2 * hessian_rel(model, U32) * float(H.norm())
    assert abs(got.eigenvalue - want) <= bound, (got, want, bound)
    assert checked(bound / abs(want)) > 0


def test_ragged_micro_batches_give_what_one_batch_gives(reference):
    """Each micro-batch's mean loss weighted by its share of all label tokens: 1 + 3 examples (ragged, padded),
    2 + 2 and one batch of 4 are the same loss, so the same Hessian."""
    model, H = reference
    examples = ragged_examples(LENGTHS)
    g = torch.Generator().manual_seed(5)
    params = [p for p in model.parameters() if p.requires_grad]
    v = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in params]
    one = HessianOperator(model, padded_batches(examples, 4), train_step=float64_loss)
    flat = torch.cat([h.reshape(-1) for h in one(v)])
    want = H @ torch.cat([x.reshape(-1) for x in v])
    # the product against the independent dense reference, both float64 computations of the same sums:
    # |(E1 - E2) v| <= (|E1|_F + |E2|_F) |v|
    v_norm = float(torch.cat([x.reshape(-1) for x in v]).norm())
    product_bound = 2 * hessian_rel(model) * float(H.norm()) * v_norm
    assert float((flat - want).norm()) <= product_bound, float((flat - want).norm())
    batchings = [[examples[:1], examples[1:]], [examples[:2], examples[2:]]]
    for parts in batchings:
        batches = [b for part in parts for b in padded_batches(part, len(part))]
        other = torch.cat([h.reshape(-1) for h in HessianOperator(model, batches, train_step=float64_loss)(v)])
        # the same sums in another order (and padding, which the mask and -100 labels leave out)
        assert float((other - flat).norm()) <= product_bound, float((other - flat).norm())
    # and the eigenvalue: each within TOL |λ| of the same top eigenvalue (plus round-off)
    a = top_hessian_eigenvalue(model, padded_batches(examples, 4), tol=TOL, max_iter=500, train_step=float64_loss)
    batches = [b for part in batchings[0] for b in padded_batches(part, len(part))]
    b = top_hessian_eigenvalue(model, batches, tol=TOL, max_iter=500, train_step=float64_loss)
    assert a.converged and b.converged
    bound = TOL * (abs(a.eigenvalue) + abs(b.eigenvalue)) + 4 * hessian_rel(model) * float(H.norm())
    assert abs(a.eigenvalue - b.eigenvalue) <= bound, (a, b, bound)


def test_not_converged_is_reported_and_the_residual_still_bounds_an_eigenvalue(reference):
    """Stopped before the criterion is met, the result says so; whatever the iterate, an eigenvalue lies within
    its residual of its Rayleigh quotient (Krylov-Weinstein), plus the products' round-off."""
    model, H = reference
    got = top_hessian_eigenvalue(model, padded_batches(ragged_examples(LENGTHS), 2), tol=TOL, max_iter=3,
                                 train_step=float64_loss)
    assert not got.converged and got.iterations == 3 and got.residual > TOL * abs(got.eigenvalue)
    nearest = float((torch.linalg.eigvalsh(H) - got.eigenvalue).abs().min())
    assert nearest <= got.residual + 2 * hessian_rel(model) * float(H.norm()), (nearest, got)


def test_modes_restored_and_refusals():
    model = adapter_model()
    model.train()
    batches = padded_batches(ragged_examples(LENGTHS), 2)
    top_hessian_eigenvalue(model, batches, tol=1e-2, max_iter=3, train_step=float64_loss)
    assert all(m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(UsageError, match="tol must be"):
        top_hessian_eigenvalue(model, batches, tol=0.0)
    masked = [{**b, "labels": torch.full_like(b["labels"], -100)} for b in batches]
    with pytest.raises(UsageError, match="nothing to predict"):
        top_hessian_eigenvalue(model, masked)
    frozen = tiny_llama()
    with pytest.raises(UsageError, match="no trainable parameter"):
        top_hessian_eigenvalue(frozen.requires_grad_(False), batches)
