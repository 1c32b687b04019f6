"""get_lora_one_model reads the whole LoraConfig as PEFT reads it: the layers that take a gradient are
exactly those a stock `peft.get_peft_model` wraps, and each gets the step-0 update of its own r and
scale, in every gradient mode, against a dense float64 full fine-tuning gradient."""

import copy

import pytest
import torch
from conftest import full_finetuning_gradients, padded_batches, ragged_examples, tiny_llama
from numerics import checked, gradient_tol, relative_error, truncation_tol
from peft import LoraConfig, get_peft_model
from peft.utils import ModulesToSaveWrapper
from tiny_models import one_thread  # noqa: F401 (autouse fixture: tiny matrices run fastest on one thread)
from torch import nn

import lora_one.core.init
from lora_one import LoraOneConfig, estimate_gradients, get_lora_one_model
from lora_one.core.errors import UsageError
from lora_one.core.targets import lora_layers

R, ALPHA, GAMMA = 4, 16.0, 8.0
# One field of the LoraConfig each, beside the global r = 4.
FIELDS = {
    "target_modules=None": {"target_modules": None},  # PEFT's Llama default: q_proj, v_proj
    "exclude_modules": {"target_modules": "all-linear", "exclude_modules": ["k_proj", "down_proj"]},
    "layers_to_transform": {"target_modules": ["q_proj", "v_proj", "down_proj"], "layers_to_transform": [1],
                            "layers_pattern": "layers"},
    "rank_pattern": {"target_modules": ["q_proj", "v_proj"],
                     "rank_pattern": {"q_proj": 6, "layers.1.self_attn.v_proj": 3}},
    "alpha_pattern": {"target_modules": ["q_proj", "v_proj"], "alpha_pattern": {"v_proj": 4.0}},
    "modules_to_save": {"target_modules": "all-linear", "modules_to_save": ["down_proj"]},  # trained whole, no LoRA
}
# 5 + 3 + 6 = 14 tokens, 7 of them predicted: every layer's gradient has rank 7 (the last layer's
# q, o and MLP) or 11, above each r used here and at most the sketch's k = min(4 r, out, in) columns, so
# that every top-r subspace is determined and the sketch's top-r SVD exact but for round-off.
EXAMPLES = ragged_examples(lengths=(5, 3, 6))
MODES = {  # micro-batches: padded, a short last one; single-batch takes all in one
    "accumulate": padded_batches(EXAMPLES, 2),
    "single-batch": padded_batches(EXAMPLES, 3),
    "sketch": padded_batches(EXAMPLES, 2),
}


@pytest.fixture(scope="module")
def reference():
    """The float64 full fine-tuning gradient of every weight, one unpadded example at a time."""
    return full_finetuning_gradients(tiny_llama().double(), EXAMPLES)


def config(field: str) -> LoraConfig:
    return LoraConfig(r=R, lora_alpha=ALPHA, use_rslora=True, **FIELDS[field])


def saved_modules(model) -> set[str]:
    return {n.removeprefix("base_model.model.") for n, m in model.named_modules()
            if isinstance(m, ModulesToSaveWrapper)}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("field", FIELDS)
def test_the_layers_peft_wraps_take_the_step_of_their_own_rank_and_scale(field, mode, reference, monkeypatch):
    stock = get_peft_model(tiny_llama(), copy.deepcopy(config(field)))
    wrapped = {n: (layer.r["default"], layer.scaling["default"]) for n, layer in lora_layers(stock).items()}
    estimated = []  # the layers of each gradient phase

    def recording(*args, **kwargs):
        gradients = estimate_gradients(*args, **kwargs)
        estimated.append(set(gradients))
        return gradients

    monkeypatch.setattr(lora_one.core.init, "estimate_gradients", recording)
    model = get_lora_one_model(tiny_llama(), config(field), MODES[mode], show_progress_bar=False,
                               config=LoraOneConfig(gamma=GAMMA, grad_mode=mode, init_samples=None))
    layers = lora_layers(model)
    assert estimated == [set(wrapped)]  # no gradient for a layer PEFT leaves alone
    assert {n: (layer.r["default"], layer.scaling["default"]) for n, layer in layers.items()} == wrapped
    assert saved_modules(model) == saved_modules(stock)
    tol = gradient_tol(tiny_llama(), EXAMPLES)  # of the float32 gradient against the float64 one
    for name, layer in layers.items():
        r, s = wrapped[name]
        U, S, Vh = torch.linalg.svd(-reference[name], full_matrices=False)
        want = s * (U[:, :r] * S[:r]) @ Vh[:r] / (GAMMA * S[0])  # s B A = -(s / (gamma sigma_1)) G_r
        got = s * layer.lora_B["default"].weight.detach().double() @ layer.lora_A["default"].weight.detach().double()
        assert relative_error(got, want) <= checked(truncation_tol(reference[name], r, tol)), (name, r)


def test_a_rank_pattern_too_large_for_its_layer_is_refused_before_any_work():
    """k_proj is (16, 32): its own r = 20 does not fit, though the global r = 4 does. Refused before a
    batch is read, and the model is handed back without LoRA layers."""

    def no_batches():
        raise AssertionError("a batch was read")
        yield

    model = tiny_llama()
    lora = LoraConfig(r=R, lora_alpha=ALPHA, use_rslora=True, target_modules="all-linear", rank_pattern={"k_proj": 20})
    with pytest.raises(UsageError, match=r"r=20 is larger than the smallest dimension of layer "
                                         r"'model.layers.0.self_attn.k_proj' \(16, 32\)"):
        get_lora_one_model(model, lora, no_batches(), config=LoraOneConfig(grad_mode="sketch"), show_progress_bar=False)
    assert not lora_layers(model) and type(model.model.layers[0].self_attn.k_proj) is nn.Linear


def test_a_plain_model_matches_target_modules_as_peft_does():
    """`estimate_gradients` on a plain model: `None` is PEFT's default for the architecture, the
    default is all-linear (without the LM head)."""
    batches = MODES["accumulate"]
    default = estimate_gradients(tiny_llama(), batches, target_modules=None, init_samples=None, show_progress_bar=False)
    assert set(default) == set(lora_layers(get_peft_model(tiny_llama(), LoraConfig(target_modules=None))))
    every = estimate_gradients(tiny_llama(), batches, init_samples=None, show_progress_bar=False)
    assert len(every) == 14 and "lm_head" not in every


def test_a_rank_per_layer_must_cover_every_target():
    with pytest.raises(UsageError, match=r"rank gives no r for the target layer 'model.layers.0.self_attn.v_proj'"):
        estimate_gradients(tiny_llama(), MODES["sketch"], target_modules=["q_proj", "v_proj"], grad_mode="sketch",
                           rank={"model.layers.0.self_attn.q_proj": 4}, init_samples=None, show_progress_bar=False)


def test_a_gradient_cache_holds_a_rank_per_layer(tmp_path, capsys):
    """A rank_pattern in sketch mode is stored with each layer's rank: a second call reads it (no backward)
    and starts from the same factors bit for bit; a larger rank for one layer recomputes."""
    def init(lora):
        model = get_lora_one_model(tiny_llama(), lora, MODES["sketch"], show_progress_bar=False,
                                   config=LoraOneConfig(grad_mode="sketch", init_samples=None, grad_cache=tmp_path))
        return {n: p.detach() for n, p in model.named_parameters() if "lora_" in n}, model.lora_one_metadata

    (first, meta1), (second, meta2) = init(config("rank_pattern")), init(config("rank_pattern"))
    assert (meta1["gradient_cache"]["hit"], meta2["gradient_cache"]["hit"]) == (False, True)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    larger = config("rank_pattern")
    larger.rank_pattern = {k: v + 2 for k, v in larger.rank_pattern.items()}
    _, meta3 = init(larger)
    assert not meta3["gradient_cache"]["hit"] and "fewer than rank" in capsys.readouterr().out
