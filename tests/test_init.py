"""init_lora_one / get_lora_one_model: step-0 identities, stock-PEFT round trips, determinism."""

import copy
import json
import warnings

import pytest
import torch
from conftest import cls_batches, lm_batches, tiny_bert, tiny_llama
from peft import LoraConfig, PeftModel
from safetensors.torch import load_file
from tiny_models import LORA

from lora_one import VARIANTS, LoraOneConfig, estimate_gradients, get_lora_one_model, init_lora_one, save_adapter
from lora_one.linalg.spectral import exact_svd
from numerics import assert_same_outputs, checked, relative_error, sum_tol, truncation_tols


def logits(model, batches):
    with torch.no_grad():
        return torch.cat([model(**{k: v for k, v in b.items() if k != "labels"}).logits for b in batches])


def perturb_adapter(peft_model, seed=7):
    """Stand-in for training: move every LoRA factor."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if ".lora_" in n:
                p.add_(0.05 * torch.randn(p.shape, generator=g))


def lora_pairs(peft_model):
    for name, module in peft_model.get_base_model().named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            yield name, module


@pytest.mark.parametrize("variant", ["lora-one", "spectral"])
def test_step0_is_a_normalised_rank_r_gradient_step(variant):
    model, batches = tiny_llama(), lm_batches()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    G = estimate_gradients(model, batches, show_progress_bar=False, init_samples=4)
    peft_model = get_lora_one_model(model, LoraConfig(**LORA), batches,
                                    config=LoraOneConfig(variant=variant, gamma=64, svd="exact", init_samples=4))
    s = 16 / 4**0.5
    stats = {row["layer"]: row for row in peft_model.lora_one_metadata["layers"]}
    for name, layer in lora_pairs(peft_model):
        t = exact_svd(G[name].double(), 4)
        G_r = t.U @ torch.diag(t.S) @ t.Vh
        step = s / (64 * t.S[0]) if variant == "lora-one" else s / 64
        W = weights[name + ".weight"].double()
        BA = layer.lora_B["default"].weight.double() @ layer.lora_A["default"].weight.double()
        # the init's float32 SVD of this same G: backward stable, G + E with |E| within a sum over a row and a column
        rel = sum_tol(sum(G[name].shape))
        tol, norm_tol = truncation_tols(G[name], 4, rel)
        assert relative_error(s * BA, -step * G_r) <= checked(tol), name
        assert torch.equal(layer.get_base_layer().weight, weights[name + ".weight"])  # base untouched
        # the layer table: the gradient's top singular value (Weyl: moves by |E| at most) and |step| / |W|
        assert stats[name]["sigma_1"] == pytest.approx(float(t.S[0]), rel=rel * float(G[name].norm() / t.S[0]))
        assert stats[name]["relative_update"] == pytest.approx(float((step * G_r).norm() / W.norm()), rel=norm_tol)


@pytest.mark.parametrize("variant", VARIANTS)
def test_round_trip_through_stock_peft(variant, tmp_path):
    """The saved folder + stock PeftModel.from_pretrained on the UNTOUCHED base reproduce the
    trained model's logits; base-changing variants keep the function at step 0."""
    base, batches = tiny_llama(), lm_batches()
    base_logits = logits(base, batches)
    peft_model = get_lora_one_model(copy.deepcopy(base), LoraConfig(**LORA), batches,
                                    config=LoraOneConfig(variant=variant, gamma=16, init_samples=4))
    step0 = logits(peft_model, batches)
    if variant in ("lora-one-v1", "lora-ga", "pissa", "lora"):
        assert_same_outputs(step0, base_logits, base, positions=12)  # W - sBA + sBA, rounded
    else:
        assert (step0 - base_logits).abs().max() > 1e-4  # a real step was taken
    perturb_adapter(peft_model)
    trained = logits(peft_model, batches)
    save_adapter(peft_model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["init_lora_weights"] is True
    assert config["r"] == (8 if variant in ("lora-one-v1", "lora-ga", "pissa") else 4)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter")
    assert_same_outputs(logits(loaded, batches), trained, base, positions=12)  # rank-2r factors: other sums
    sidecar = json.loads((tmp_path / "adapter" / "lora_one.json").read_text())
    assert sidecar["variant"] == variant and sidecar["init_samples"] == 4
    assert len(sidecar["init_samples_sha256"]) == 64 and sidecar["lora_one_version"]


def test_sequence_classification_round_trip(tmp_path):
    base, batches = tiny_bert(), cls_batches()
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="SEQ_CLS")
    peft_model = get_lora_one_model(copy.deepcopy(base), config, batches,
                                    config=LoraOneConfig(gamma=16, init_samples=4))
    perturb_adapter(peft_model)
    save_adapter(peft_model, tmp_path / "cls")
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "cls")
    assert torch.equal(logits(loaded, batches), logits(peft_model, batches))  # the same weights, the same arithmetic


@pytest.mark.parametrize("variant", ["lora-one", "lora-ga", "lora"])
def test_same_seed_gives_bit_identical_adapter(variant, tmp_path):
    for run in ("a", "b"):
        model = tiny_llama()
        peft_model = get_lora_one_model(model, LoraConfig(**LORA), lm_batches(),
                                        config=LoraOneConfig(variant=variant, seed=3, init_samples=4))
        save_adapter(peft_model, tmp_path / run)
    a, b = (load_file(tmp_path / run / "adapter_model.safetensors") for run in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_rank_larger_than_a_layer_is_refused_before_any_work():
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"r=40 is larger than the smallest dimension of layer"):
        get_lora_one_model(model, LoraConfig(r=40, target_modules="all-linear"), [])


def test_unknown_variant():
    with pytest.raises(ValueError, match="Unknown variant 'lora-two'"):
        get_lora_one_model(tiny_llama(), LoraConfig(**LORA), lm_batches(), config=LoraOneConfig(variant="lora-two"))


def test_missing_gradient_for_a_layer():
    model, batches = tiny_llama(), lm_batches()
    G = estimate_gradients(model, batches, target_modules=["q_proj"], show_progress_bar=False, init_samples=4)
    peft_model = get_lora_one_model(model, LoraConfig(**LORA), None, config=LoraOneConfig(variant="lora"))
    with pytest.raises(ValueError, match="No gradient for LoRA layer 'model.layers.0.self_attn.k_proj'"):
        init_lora_one(peft_model, G)


def test_init_accepts_peft_model_names():
    """Gradients keyed by the PeftModel's own module names work as well as base-model names."""
    model, batches = tiny_llama(), lm_batches()
    G = estimate_gradients(model, batches, show_progress_bar=False, init_samples=4)
    peft_a = get_lora_one_model(copy.deepcopy(model), LoraConfig(**LORA), None, config=LoraOneConfig(variant="lora"))
    peft_b = copy.deepcopy(peft_a)
    init_lora_one(peft_a, G)
    init_lora_one(peft_b, {f"base_model.model.{k}.base_layer": v for k, v in G.items()})
    for (na, pa), (nb, pb) in zip(peft_a.named_parameters(), peft_b.named_parameters()):
        assert na == nb and torch.equal(pa, pb)


def test_lora_one_without_rslora_warns_of_its_sqrt_r_smaller_step():
    """`use_rslora=False` scales by alpha / r instead of the spec's alpha / sqrt(r): lora-one's step-0
    update is sqrt(r) = 2 times smaller, and get_lora_one_model says so once; PEFT's own inits do not warn."""
    model, batches = tiny_llama(), lm_batches()
    updates = {}
    for variant, rslora in (("lora-one", True), ("lora-one", False), ("lora", False)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            peft_model = get_lora_one_model(copy.deepcopy(model), LoraConfig(**{**LORA, "use_rslora": rslora}),
                                            batches, config=LoraOneConfig(variant=variant, init_samples=4),
                                            show_progress_bar=False)
        said = [str(w.message) for w in caught if "use_rslora" in str(w.message)]
        assert len(said) == (variant == "lora-one" and not rslora), said
        assert all("Pass use_rslora=True" in m for m in said)
        layer = dict(lora_pairs(peft_model))["model.layers.0.mlp.down_proj"]
        B, A = layer.lora_B["default"].weight, layer.lora_A["default"].weight
        updates[variant, rslora] = layer.scaling["default"] * (B @ A)
    ratio = updates["lora-one", True].norm() / updates["lora-one", False].norm()
    assert float(ratio) == pytest.approx(4**0.5, rel=sum_tol(4 + 2))  # two float32 products of r = 4 terms
