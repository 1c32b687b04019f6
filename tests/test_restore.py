"""`restore_lora_one`: the step-0 PEFT model rebuilt from `lora_one_state` (what a checkpoint stores)
without the gradient phase, bit-identical to the init's, residual base weights included."""

from __future__ import annotations

import pytest
import torch
from conftest import lm_batches, tiny_llama
from peft import LoraConfig
from peft.tuners.lora import LoraLayer

from lora_one import VARIANTS, LoraOneConfig, get_lora_one_model
from lora_one.core.errors import UsageError
from lora_one.core.init import lora_one_state, restore_lora_one


def config(r=2):
    return LoraConfig(r=r, lora_alpha=4, use_rslora=True, target_modules="all-linear")


def no_init_work(monkeypatch):
    def init_again(*args, **kwargs):
        raise AssertionError("restore_lora_one must not redo the init")

    for name in ("estimate_gradients", "lora_factors_and_spectrum"):  # the gradient phase, our SVD
        monkeypatch.setattr(f"lora_one.core.init.{name}", init_again)
    for name in ("pissa_init", "lora_ga_init"):  # PEFT's SVDs
        monkeypatch.setattr(LoraLayer, name, init_again)


# bf16 for the variants whose residual base weight is recomputed (a cast back after fp32 arithmetic)
CASES = [(v, torch.float32) for v in VARIANTS] + [(v, torch.bfloat16) for v in ("lora-one-v1", "lora-ga", "pissa")]


@pytest.mark.parametrize("variant,dtype", CASES)
def test_restore_is_the_init_bit_for_bit(variant, dtype, tmp_path, monkeypatch):
    batches = lm_batches(8, batch_size=3)
    made = get_lora_one_model(tiny_llama().to(dtype), config(), batches, config=LoraOneConfig(variant=variant),
                              show_progress_bar=False)
    torch.save(lora_one_state(made), tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=True)  # as a checkpoint stores it
    untouched = get_lora_one_model(tiny_llama().to(dtype), config(), None, config=LoraOneConfig(variant="lora"),
                                   show_progress_bar=False).state_dict()

    no_init_work(monkeypatch)
    restored = restore_lora_one(tiny_llama().to(dtype), config(), state)
    want, got = made.state_dict(), restored.state_dict()
    assert want.keys() == got.keys()
    for name in want:  # the residual base weights, the factors, everything
        assert torch.equal(want[name], got[name]), name
    assert restored.lora_one_metadata == made.lora_one_metadata
    if made.lora_one_initial_state is None:
        assert restored.lora_one_initial_state is None
    else:
        assert made.lora_one_initial_state.keys() == restored.lora_one_initial_state.keys()
        assert all(torch.equal(v, restored.lora_one_initial_state[k]) for k, v in made.lora_one_initial_state.items())
    bases = [k for k in got if k.endswith("base_layer.weight")]
    changed = [k for k in bases if not torch.equal(got[k], untouched[k])]
    assert len(changed) == (len(bases) if variant in ("lora-one-v1", "lora-ga", "pissa") else 0)


def test_restore_refuses_another_rank():
    made = get_lora_one_model(tiny_llama(), config(2), lm_batches(8), show_progress_bar=False)
    with pytest.raises(UsageError, match="does not fit"):
        restore_lora_one(tiny_llama(), config(4), lora_one_state(made))
