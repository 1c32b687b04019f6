"""Memory modes of estimate_gradients (sketch, single-batch, offload) against accumulate mode and
dense references; gradient checkpointing, bf16 and PeftModel inputs."""

import copy
import itertools

import pytest
import torch
from conftest import (
    VOCAB,
    cls_batches,
    full_finetuning_gradients,
    lm_batches,
    padded_batches,
    ragged_examples,
    tiny_llama,
)
from numerics import assert_close_products, assert_same_top_svd, gradient_tol, sum_tol
from peft import LoraConfig, get_peft_model
from torch.utils.data import DataLoader
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

from lora_one import LoraOneConfig, estimate_gradients, get_lora_one_model
from lora_one.core.constants import DEFAULT_SKETCH_PASSES
from lora_one.linalg.sketch import GradientSketch, default_sizes
from lora_one.linalg.spectral import TopSVD, exact_svd, lora_factors, subspace_sine


def tiny_llama_with(**dropouts) -> LlamaForCausalLM:
    """conftest's tiny Llama (same weights) with other dropout settings."""
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                        **dropouts))


def tiny_bert_with(**dropouts) -> BertForSequenceClassification:
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                                                    num_hidden_layers=2, num_attention_heads=4,
                                                    max_position_embeddings=64, num_labels=3, **dropouts))

def test_matrix_free_sketch_equals_dense_sketch():
    g = torch.Generator().manual_seed(0)
    grads, inputs = torch.randn(50, 12, generator=g), torch.randn(50, 20, generator=g)
    a, b = GradientSketch.empty(12, 20, 5, 11, seed=3), GradientSketch.empty(12, 20, 5, 11, seed=3)
    a.add_tokens(grads, inputs)
    b.add_matrix(grads.T @ inputs)
    G, grads, inputs = (grads.T @ inputs).double(), grads.double(), inputs.double()
    omega, psi = a.omega.double(), a.psi.double()
    # each entry is a float32 sum over the 50 tokens and a width (20 or 12): elementwise within that chain's
    # bound of the same sum of magnitudes
    Y_mag, W_mag = grads.abs().T @ (inputs.abs() @ omega.abs()), (psi.abs() @ grads.abs().T) @ inputs.abs()
    for got, exact, mag in ((a.Y, G @ omega, Y_mag), (b.Y, G @ omega, Y_mag), (a.W, psi @ G, W_mag),
                            (b.W, psi @ G, W_mag)):
        assert ((got.double() - exact).abs() <= sum_tol(50 + 20) * mag).all()


def test_sketch_reconstructs_an_exactly_low_rank_matrix():
    g = torch.Generator().manual_seed(1)
    G = torch.randn(40, 6, generator=g) @ torch.randn(6, 30, generator=g)  # rank 6
    k, l = default_sizes(4, 40, 30)
    sk = GradientSketch.empty(40, 30, k, l, seed=0)
    sk.add_matrix(G)
    # float32 sketches, sums over a side (30 or 40) each: the sketch holds G + E within that bound
    assert_same_top_svd(sk.top_svd(4), G, 4, sum_tol(40 + 30))


def assert_same_top_subspace(svd: TopSVD, G: torch.Tensor, r: int, model, batches, computations: int = 2):
    """`svd` is the top-r SVD of `G` up to the float32 round-off of `computations` gradients of `batches`
    (`G` computed by the library in float32 too, or a float64 reference with `computations=1`)."""
    assert_same_top_svd(svd, G, r, computations * gradient_tol(model, batches))


def test_sketch_mode_with_full_sketch_equals_accumulate():
    """With sketches as wide as the layer the single-pass SVD is exact: it must match the exact top-r
    SVD of the accumulated gradient, and the factors must match too."""
    model, batches = tiny_llama(), lm_batches(n=4, batch_size=2)
    G = estimate_gradients(model, batches, show_progress_bar=False, init_samples=4)
    S = estimate_gradients(model, batches, show_progress_bar=False, init_samples=4, grad_mode="sketch", rank=4,
                           oversample=64)
    assert S.keys() == G.keys()
    sketched, exact = {}, {}
    for name in G:
        assert_same_top_subspace(S[name], G[name], 4, model, batches)
        B1, A1 = lora_factors(S[name], 4, "lora-one", 16.0)
        B2, A2 = lora_factors(G[name], 4, "lora-one", 16.0, "exact")
        sketched[name], exact[name] = B1 @ A1, B2 @ A2
    # both from this same G: the sketch's float32 sums over the 48 tokens and a side (at most 48 wide), and
    # a backward stable float32 SVD
    assert_close_products(sketched, G, 4, 16.0, sum_tol(48 + 48) + sum_tol(2 * 48), want=exact)


def test_sketch_mode_never_forms_a_weight_gradient(llama):
    snapshot = {n: p.requires_grad for n, p in llama.named_parameters()}
    for p in llama.parameters():
        p.register_post_accumulate_grad_hook(lambda p: pytest.fail("a weight gradient was formed"))
    estimate_gradients(llama, lm_batches(), show_progress_bar=False, init_samples=4, grad_mode="sketch", rank=2)
    assert {n: p.requires_grad for n, p in llama.named_parameters()} == snapshot
    assert all(p.grad is None for p in llama.parameters())


def test_every_mode_gives_the_reference_gradient_on_ragged_data(llama):
    """Ragged examples (5, 9, 14, 7 tokens): single-batch (one padded batch of 4) and sketch (1 and 2
    passes over micro-batches of 3 + 1, sketches as wide as the layers, so exact) give the top-4 SVD
    of the independent full-batch reference, singular values included (they carry the weighting)."""
    examples = ragged_examples()
    reference = full_finetuning_gradients(llama, examples)
    runs = {
        "single-batch": estimate_gradients(llama, padded_batches(examples, 4), show_progress_bar=False, init_samples=4,
                                           grad_mode="single-batch", rank=4),
        **{f"sketch {p}": estimate_gradients(llama, padded_batches(examples, 3), show_progress_bar=False,
                                             init_samples=4, grad_mode="sketch", rank=4, oversample=64,
                                             sketch_passes=p) for p in (1, 2)},
    }
    for mode, svds in runs.items():
        assert svds.keys() <= reference.keys(), mode
        for name, svd in svds.items():
            assert_same_top_subspace(svd, reference[name], 4, llama, examples, computations=1)
    with pytest.raises(ValueError, match="needs exactly one micro-batch per rank.* this rank has 2"):
        estimate_gradients(llama, padded_batches(examples, 2), show_progress_bar=False, init_samples=4,
                           grad_mode="single-batch", rank=4)


def test_gradient_checkpointing_is_active_and_agrees(llama):
    """Transformers checkpoints activations in training mode only: the estimate must keep the model
    there, so a module inside a checkpointed decoder layer runs twice per batch (the forward, then
    the recompute in the backward), even for a model the user left in eval mode; same gradient."""
    batches = lm_batches()
    G = estimate_gradients(llama, batches, show_progress_bar=False, init_samples=4)
    ckpt = copy.deepcopy(llama)
    ckpt.activation_checkpointing_enable()
    ckpt.eval()
    calls = []
    # a pre-hook: the recompute stops early, right after the last tensor the backward needs
    ckpt.model.layers[0].mlp.register_forward_pre_hook(lambda *_: calls.append(1))
    for mode, passes in (("accumulate", 1), ("sketch", 2)):
        calls.clear()
        out = estimate_gradients(ckpt, batches, show_progress_bar=False, init_samples=4, grad_mode=mode, rank=4,
                                 oversample=64, offload=True, sketch_passes=passes)
        assert len(calls) == 2 * len(batches) * passes, mode
        assert not ckpt.training
        for name in G:
            if mode == "accumulate":
                assert torch.equal(out[name], G[name])  # recomputed activations, the same sums
            else:
                assert_same_top_subspace(out[name], G[name], 4, llama, batches)


def test_dropout_is_off_in_training_mode_and_restored():
    """Large dropouts of every kind (nn.Dropout modules, BERT's; the float `attention_dropout` that
    Llama's attention reads in training mode) give exactly the dropout-free gradient, and are put back."""
    models = {
        "llama": (lambda p: tiny_llama_with(attention_dropout=p), lm_batches()),
        "bert": (lambda p: tiny_bert_with(hidden_dropout_prob=p, attention_probs_dropout_prob=p), cls_batches()),
    }
    for kind, (make, batches) in models.items():
        plain = estimate_gradients(make(0.0), batches, show_progress_bar=False, init_samples=4)
        noisy_model = make(0.6).train()
        noisy = estimate_gradients(noisy_model, batches, show_progress_bar=False, init_samples=4)
        for name in plain:
            assert torch.equal(noisy[name], plain[name]), (kind, name)
        rates = [m.p for m in noisy_model.modules() if isinstance(m, torch.nn.Dropout)]
        rates += [m.attention_dropout for m in noisy_model.modules() if hasattr(m, "attention_dropout")]
        assert rates and set(rates) == {0.6} and noisy_model.training, kind


def test_layer_shapes_come_from_in_and_out_features():
    """A packed weight (as bitsandbytes' 4-bit Linear keeps it) has another shape than (out, in):
    sketch mode, which takes no weight gradient, must size its sketches from the layer itself."""

    class Packed(torch.nn.Linear):
        def __init__(self, linear):
            super().__init__(linear.in_features, linear.out_features, bias=False)
            self.weight = torch.nn.Parameter(linear.weight.detach().reshape(-1, 2).clone(), requires_grad=False)

        def forward(self, x):
            return torch.nn.functional.linear(x, self.weight.reshape(self.out_features, self.in_features))

    model, batches = tiny_llama(), lm_batches()
    G = estimate_gradients(model, batches, show_progress_bar=False, init_samples=4)
    for layer in model.model.layers:
        layer.self_attn.q_proj = Packed(layer.self_attn.q_proj)
    S = estimate_gradients(model, batches, show_progress_bar=False, init_samples=4, grad_mode="sketch", rank=4,
                           oversample=64)
    for name in G:
        assert_same_top_subspace(S[name], G[name], 4, model, batches)


def test_bf16_model_accumulates_in_fp32(llama):
    batches = lm_batches()
    G = estimate_gradients(llama, batches, show_progress_bar=False, init_samples=4)
    half = copy.deepcopy(llama).to(torch.bfloat16)
    for mode in ("accumulate", "sketch"):
        out = estimate_gradients(half, batches, show_progress_bar=False, init_samples=4, grad_mode=mode, rank=2,
                                 oversample=64)
        for name in G:
            if mode == "accumulate":
                assert out[name].dtype == torch.float32
                rel = (out[name] - G[name]).norm() / G[name].norm()
            else:
                e = exact_svd(G[name].double(), 2)
                rel = subspace_sine(e.U, out[name].U)
            assert rel < 0.1, (mode, name, float(rel))


def test_get_lora_one_model_in_sketch_mode_on_a_peft_model():
    model, batches = tiny_llama(), lm_batches()
    config = LoraConfig(r=4, lora_alpha=16, use_rslora=True, target_modules="all-linear")
    sketched = get_lora_one_model(copy.deepcopy(model), config, batches,
                                  config=LoraOneConfig(grad_mode="sketch", init_samples=4))
    assert sketched.lora_one_metadata["grad_mode"] == "sketch"
    assert sketched.lora_one_metadata["sketch_passes"] == DEFAULT_SKETCH_PASSES == 2
    # the sketch of a PeftModel (B = 0: the function of the base) sees the same gradient
    wrapped = get_peft_model(copy.deepcopy(model), config)
    from_peft = estimate_gradients(wrapped, batches, show_progress_bar=False, init_samples=4, grad_mode="sketch",
                                   rank=4, oversample=64)
    G = estimate_gradients(model, batches, show_progress_bar=False, init_samples=4)
    for name in G:
        assert_same_top_subspace(from_peft[name], G[name], 4, model, batches)


def test_sketch_passes_approach_the_exact_svd():
    """A narrow sketch (k = 8, l = 17 on 16- to 48-wide layers) of a flat-spectrum tiny gradient: one
    pass misses the top-4 subspaces (median sine 0.93 measured), three passes find them (median 1.1e-2,
    max 6.2e-2 measured)."""
    model, batches = tiny_llama(), lm_batches(n=4)
    G = estimate_gradients(model, batches, show_progress_bar=False, init_samples=4)
    truth = {name: exact_svd(g.double(), 4) for name, g in G.items()}
    median, worst = {}, {}
    for passes in (1, 3):
        S = estimate_gradients(model, batches, show_progress_bar=False, init_samples=4, grad_mode="sketch", rank=4,
                               oversample=4, sketch_passes=passes)
        sines = sorted(max(subspace_sine(truth[n].U, S[n].U), subspace_sine(truth[n].Vh.T, S[n].Vh.T)) for n in G)
        median[passes], worst[passes] = sines[len(sines) // 2], sines[-1]
    assert median[1] > 0.5 and median[3] < 0.03 and worst[3] < 0.15, (median, worst)


def test_sketch_passes_reuse_the_samples_of_a_generator_or_shuffling_loader(llama):
    """Every pass sees the samples of the first: a generator works, and a shuffling DataLoader (which
    would draw other samples on a second iteration) gives the sketch of the samples it drew first."""
    batches = lm_batches(n=8)
    listed = estimate_gradients(llama, batches, show_progress_bar=False, init_samples=8, grad_mode="sketch", rank=2,
                                sketch_passes=2)
    generated = estimate_gradients(llama, (b for b in batches), show_progress_bar=False, init_samples=8,
                                   grad_mode="sketch", rank=2, sketch_passes=2)

    def loader():
        data = [{k: v[0] for k, v in b.items()} for b in lm_batches(n=20)]
        return DataLoader(data, batch_size=2, shuffle=True, generator=torch.Generator().manual_seed(5))

    shuffled = estimate_gradients(llama, loader(), show_progress_bar=False, init_samples=6, grad_mode="sketch", rank=2,
                                  sketch_passes=2)
    drawn = list(itertools.islice(loader(), 3))
    expected = estimate_gradients(llama, drawn, show_progress_bar=False, init_samples=None, grad_mode="sketch", rank=2,
                                  sketch_passes=2)
    for got, want in ((generated, listed), (shuffled, expected)):
        for name in want:
            assert torch.equal(got[name].U, want[name].U) and torch.equal(got[name].S, want[name].S), name
    with pytest.raises(ValueError, match="needs grad_mode='sketch'"):
        estimate_gradients(llama, batches, show_progress_bar=False, init_samples=4, grad_mode="accumulate",
                           sketch_passes=2)
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="sketch_passes must be an integer >= 1"):
            estimate_gradients(llama, batches, show_progress_bar=False, init_samples=4, grad_mode="sketch", rank=2,
                               sketch_passes=bad)


def test_bad_mode_arguments(llama):
    with pytest.raises(ValueError, match="Unknown grad_mode"):
        estimate_gradients(llama, lm_batches(), grad_mode="stream", init_samples=4)
    with pytest.raises(ValueError, match="needs the LoRA rank"):
        estimate_gradients(llama, lm_batches(), grad_mode="sketch", init_samples=4)
    with pytest.raises(ValueError, match="lora-ga runs PEFT's own implementation"):
        get_lora_one_model(llama, LoraConfig(r=2, target_modules="all-linear"), lm_batches(),
                           config=LoraOneConfig(variant="lora-ga", grad_mode="sketch", init_samples=4))


def test_sketch_mode_defaults_to_two_passes(llama):
    batches = lm_batches()
    default = estimate_gradients(llama, batches, show_progress_bar=False, init_samples=4, grad_mode="sketch", rank=2)
    for passes, same in ((2, True), (1, False)):
        explicit = estimate_gradients(llama, batches, show_progress_bar=False, init_samples=4, grad_mode="sketch",
                                      rank=2, sketch_passes=passes)
        assert all(torch.equal(default[n].U, explicit[n].U) for n in default) == same
