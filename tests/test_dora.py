"""DoRA-One: DoRA (`use_dora=True`) with the LoRA-One factors and the magnitude re-initialised to the row
norms of `W + s B A`, so that the step-0 weight is exactly LoRA-One's `W - s / (gamma sigma_1) G_r`."""

import copy
import json

import pytest
import torch
from conftest import full_finetuning_gradients, lm_batches, tiny_llama
from numerics import assert_same_outputs, checked, gradient_tol, sum_tol, truncation_tol
from peft import LoraConfig, PeftModel

from lora_one import LoraOneConfig, get_lora_one_model, save_adapter

R, ALPHA, GAMMA = 4, 16.0, 8.0


def config(**kw):
    return LoraConfig(r=R, lora_alpha=ALPHA, use_rslora=True, use_dora=True, target_modules="all-linear", **kw)


def merged_weights(peft_model) -> dict[str, torch.Tensor]:
    merged = copy.deepcopy(peft_model).merge_and_unload()
    return {n[: -len(".weight")]: p.detach() for n, p in merged.named_parameters() if n.endswith(".weight")}


@pytest.mark.parametrize("variant", ["lora-one", "spectral"])
def test_step0_weight_is_the_lora_one_step(variant):
    base, batches = tiny_llama(), lm_batches(n=4)
    G = full_finetuning_gradients(base, batches)  # independent: a plain full fine-tuning backward
    W0 = {n: p.detach().clone() for n, p in base.named_parameters()}
    model = get_lora_one_model(base, config(), batches, show_progress_bar=False,
                               config=LoraOneConfig(variant=variant, gamma=GAMMA, svd="exact", init_samples=4))
    merged = merged_weights(model)
    s = ALPHA / R**0.5
    layers = [n for n in merged if n in G and (n + ".weight") in W0 and "lm_head" not in n and "embed" not in n
              and "norm" not in n]
    assert len(layers) == 14
    for name in layers:
        U, S, Vh = torch.linalg.svd(G[name].double())
        G_r = (U[:, :R] * S[:R]) @ Vh[:R]
        norm = GAMMA * S[0] if variant == "lora-one" else GAMMA
        expected = W0[name + ".weight"].double() - s / norm * G_r
        got, update = merged[name].double(), s / norm * G_r
        rel = float((got - expected).norm() / update.norm())  # relative to the update
        # the init's float32 gradient, carried through the truncation, and the float32 merge
        # m * (W + s B A) / |W + s B A| (row norms: sums over the inputs), which rounds W itself
        W = W0[name + ".weight"].double()
        tol = truncation_tol(G[name], R, gradient_tol(base, batches)) + 2 * sum_tol(W.shape[1] + R) * float(
            W.norm() / update.norm())
        assert rel <= checked(tol), (name, rel, tol)


@pytest.mark.parametrize("variant", ["lora-one", "lora-one-v1", "pissa"])
def test_round_trip_through_stock_peft_and_training(tmp_path, variant):
    """Trained DoRA adapters load on the untouched base with stock PEFT (base-changing variants through
    the rank-2r conversion, which holds for DoRA too: the converted delta rebuilds `W_res + s B A`)."""
    batches = lm_batches(n=4, seed=3)
    model = get_lora_one_model(tiny_llama(), config(), lm_batches(n=4), show_progress_bar=False,
                               config=LoraOneConfig(variant=variant, gamma=GAMMA, init_samples=4))
    magnitude = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_magnitude_vector" in n}
    assert magnitude
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(20):  # memorise one batch
        loss = model(**batches[0]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.93 * losses[0]  # from near-uniform predictions (ln 96 = 4.56)
    moved = [n for n, p in model.named_parameters() if n in magnitude and not torch.equal(p, magnitude[n])]
    assert moved  # the magnitude trains too
    model.eval()
    save_adapter(model, tmp_path / "a")
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "a").eval()
    x = batches[0]["input_ids"]
    with torch.no_grad():
        assert_same_outputs(loaded(input_ids=x).logits, model(input_ids=x).logits, loaded, x.shape[1])


def test_cli_dora_finetune(tmp_path):
    """`lora-one finetune --dora`: a stock DoRA adapter whose step-0 model is LoRA-One's step."""
    from tiny_models import question_records, tiny_llama, write_jsonl  # noqa: PLC0415 (its autouse fixture)

    from lora_one.cli import main  # noqa: PLC0415

    model_dir = tiny_llama(tmp_path / "model")
    data = write_jsonl(tmp_path / "train.jsonl", question_records(40))
    out = tmp_path / "run"
    assert main(["finetune", "--model", str(model_dir), "--data", str(data), "--out", str(out), "--dora",
                 "--rank", "4", "--gamma", "16", "--max-steps", "3", "--batch-size", "4", "--eval-split", "0.2",
                 "--init-samples", "4", "--quiet", "--device", "cpu"]) == 0
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["use_dora"] is True
    from safetensors.torch import load_file  # noqa: PLC0415

    assert any("lora_magnitude_vector" in k for k in load_file(out / "adapter_model.safetensors"))
