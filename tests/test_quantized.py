"""QLoRA (issue 12, item 4): the LoRA-One init on a 4-bit or 8-bit base (bitsandbytes), in sketch mode, which
never forms a weight gradient; training; an adapter for the unquantised base.

References are independent: a full fine-tuning backward of a float32 Llama, once with the original weights
and once with the 4-bit weights dequantised by bitsandbytes into it (what the 4-bit model computes with),
then `torch.linalg.svd`.
"""

import json

import pytest
import torch
from callback_worker import Step0, lm_rows
from conftest import full_finetuning_gradients, padded_batches
from datasets import Dataset
from numerics import BUG, assert_close_products, gradient_tol, sum_tol
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from test_cli_init import run
from tiny_models import (  # noqa: F401 (fixtures: one_thread, base_dir, tok)
    one_thread,
    question_records,
    sentiment_records,
    tiny_bert,
    tiny_llama_folder,
    tiny_llama_tokenizer,
)
from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, Trainer, TrainingArguments

from lora_one import LoraOneCallback, LoraOneConfig
from lora_one.core.errors import UsageError
from lora_one.core.gradients import estimate_gradients
from lora_one.core.init import get_lora_one_model
from lora_one.core.targets import lora_layers
from lora_one.recipes import models
from lora_one.recipes.finetune import _split
from lora_one.recipes.models import load_model

bnb = pytest.importorskip("bitsandbytes")

R, GAMMA, N = 4, 16.0, 8
LORA = {"r": R, "lora_alpha": 16, "use_rslora": True, "target_modules": "all-linear"}


@pytest.fixture(scope="module")
def examples(tok):
    return [{"input_ids": torch.tensor(r["input_ids"]), "labels": torch.tensor(r["labels"])} for r in lm_rows(tok, N)]


def dequantised(base_dir, quantised) -> torch.nn.Module:
    """The float32 model with each 4-bit weight replaced by bitsandbytes' dequantisation of it."""
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    for name, module in quantised.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            w = module.weight
            model.get_submodule(name).weight.data = bnb.functional.dequantize_4bit(w.data, w.quant_state).float()
    return model


def step0_factors(peft_model) -> dict:
    return {n: (layer.lora_B["default"].weight.detach(), layer.lora_A["default"].weight.detach())
            for n, layer in lora_layers(peft_model).items()}


def assert_lora_one_step0(factors: dict, gradients: dict, rel: float) -> None:
    """`B A = -G_r / (gamma sigma_1)` for every layer, from a gradient known to relative error `rel`
    (tests/numerics.py). The sketch (k = 4r = 16, l = 2k + 1 capped at the layer's height) is exact but for
    round-off on the tiny Llama: l >= min(height, width) for every layer (16 to 64 wide), so from the second
    pass on a sketch spans a whole side of G, through orthonormal test matrices (no amplification)."""
    assert factors and factors.keys() <= gradients.keys()
    assert_close_products({name: B.double() @ A.double() for name, (B, A) in factors.items()}, gradients, R, GAMMA,
                          rel)


def own_gradients(model, batches) -> dict[str, torch.Tensor]:
    """Each int8 layer's gradient `sum_t g_t^T x_t` as the int8 model computes it: its own forward and
    backward over the same micro-batches, each batch's mean loss times its share of the loss terms (as
    `estimate_gradients` weighs them), the products summed in float64."""
    sums, handles = {}, []

    def hook(name):
        def forward(module, args, output):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()

            def add(g):
                sums[name] = sums.get(name, 0) + g.reshape(-1, g.shape[-1]).double().T @ x

            output.register_hook(add)
        return forward

    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear8bitLt):
            handles.append(module.register_forward_hook(hook(name)))
    handles.append(model.get_input_embeddings().register_forward_hook(lambda m, a, out: out.requires_grad_(True)))
    terms = [int((b["labels"][:, 1:] != -100).sum()) for b in batches]
    flags = {p: p.requires_grad for p in model.parameters()}
    model.requires_grad_(False).train()  # as `estimate_gradients` runs it (no dropout in this model)
    for batch, n in zip(batches, terms):
        (model(**batch).loss * (n / sum(terms))).backward()
    for h in handles:
        h.remove()
    for p, flag in flags.items():
        p.requires_grad_(flag)
    model.eval()
    return sums


def test_4bit_sketch_init_is_the_step_of_the_quantised_model(base_dir, tok, examples):
    quantised, _, _ = load_model(str(base_dir), quantize="4bit")
    assert isinstance(quantised.model.layers[0].mlp.up_proj, bnb.nn.Linear4bit)
    reference_q = full_finetuning_gradients(dequantised(base_dir, quantised), examples)
    peft_model = get_lora_one_model(quantised, LoraConfig(**LORA), padded_batches(examples, 3, tok.pad_token_id),
                                    config=LoraOneConfig(gamma=GAMMA, grad_mode="sketch", sketch_passes=3,
                                                         init_samples=None),
                                    show_progress_bar=False)
    factors = step0_factors(peft_model)
    assert len(factors) == 14
    # packed weights have no |W| to divide by: the layer table leaves the ratio out rather than misstate it
    assert [row["relative_update"] for row in peft_model.lora_one_metadata["layers"]] == [None] * 14
    # exactly LoRA-One's step for the model that trains (its weights are the 4-bit ones), up to round-off
    assert_lora_one_step0(factors, reference_q, gradient_tol(quantised, examples))


def test_8bit_sketch_init_is_the_step_of_the_int8_model(base_dir, tok, examples):
    """LLM.int8 also rounds the inputs of each matmul (to int8 per row, a step of 1/127 of the row's largest
    magnitude), so no float32 model computes its gradient: along a network's chain those roundings come to
    ~1e-1, which no bound can tell from a bug. The reference is the int8 model's own gradient instead, from the
    same micro-batches (the same int8 roundings): the init differs from it only by the float32 sums of the
    sketch, over the tokens and a side of the layer, in each of the 3 passes."""
    quantised, _, _ = load_model(str(base_dir), quantize="8bit")
    assert isinstance(quantised.model.layers[0].mlp.up_proj, bnb.nn.Linear8bitLt)
    batches = padded_batches(examples, 3, tok.pad_token_id)
    reference = own_gradients(quantised, batches)
    tokens = sum(b["input_ids"].numel() for b in batches)
    peft_model = get_lora_one_model(
        quantised, LoraConfig(**LORA), batches, show_progress_bar=False,
        config=LoraOneConfig(gamma=GAMMA, grad_mode="sketch", sketch_passes=3, init_samples=None))
    factors = step0_factors(peft_model)
    assert len(factors) == 14
    widest = max(sum(G.shape) for G in reference.values())
    assert_lora_one_step0(factors, reference, 3 * sum_tol(tokens + widest))
    assert all(row["relative_update"] is None for row in peft_model.lora_one_metadata["layers"])  # int8 codes


def test_accumulate_mode_refuses_a_quantised_base_naming_sketch(base_dir, tok, examples):
    quantised, _, _ = load_model(str(base_dir), quantize="4bit")
    with pytest.raises(UsageError, match="Use grad_mode='sketch', which needs no weight gradient"):
        estimate_gradients(quantised, padded_batches(examples, 3, tok.pad_token_id), init_samples=None,
                           show_progress_bar=False)


@pytest.mark.parametrize("flags, message", [
    (("--grad-mode", "accumulate"), "--grad-mode accumulate needs the gradient of the weights"),
    (("--grad-mode", "single-batch"), "use --grad-mode sketch"),
    (("--variant", "pissa"), "--variant pissa rewrites the base weights"),
    (("--variant", "lora-one-v1", "--grad-mode", "sketch"), "use lora-one, spectral or lora"),
])
def test_what_a_quantised_base_cannot_do_is_one_line(flags, message, base_dir, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in question_records(12)))
    assert run("init", "--model", base_dir, "--data", data, "--out", tmp_path / "out", "--quantize", "4bit",
               *flags) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and message in err
    assert not (tmp_path / "out").exists()


def test_without_bitsandbytes_the_flag_names_the_install(base_dir, tmp_path, monkeypatch, capsys):
    find_spec = models.importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else find_spec(name, *a))
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in question_records(12)))
    assert run("init", "--model", base_dir, "--data", data, "--out", tmp_path / "out", "--quantize", "8bit") == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "pip install 'lora-one[quant]'" in err


def lora_gradients(base_dir, evaluate_first: bool) -> dict:
    """The LoRA gradients of one training step on a 4-bit model with random (non-zero) factors, with or
    without an evaluation (eval mode, no gradients) before it."""
    model, tok, _ = load_model(str(base_dir), quantize="4bit")
    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(**LORA, init_lora_weights=False))
    batch = padded_batches([{"input_ids": torch.tensor(r["input_ids"]), "labels": torch.tensor(r["labels"])}
                            for r in lm_rows(tok, 4)], 4, tok.pad_token_id)[0]
    if evaluate_first:
        with torch.no_grad():
            peft_model.eval()(**batch)
    peft_model.train()(**batch).loss.backward()
    return {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.requires_grad}


def test_training_after_an_evaluation_still_backpropagates_through_the_4bit_layers(base_dir):
    """bitsandbytes would repack the 4-bit weights at the evaluation for a CPU kernel without a backward
    (on CPUs with AVX512-BF16), and the gradient through every base layer would be lost from then on."""
    fresh, after_eval = lora_gradients(base_dir, False), lora_gradients(base_dir, True)
    assert fresh.keys() == after_eval.keys() and fresh
    for name in fresh:  # the same weights and the same kernels, the evaluation or not: the same arithmetic
        assert torch.equal(after_eval[name], fresh[name]), name


def test_finetune_on_a_4bit_base_and_the_adapter_loads_on_the_unquantised_one(base_dir, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in question_records(40)))
    out = tmp_path / "run"
    assert run("finetune", "--model", base_dir, "--data", data, "--eval-split", 0.25, "--out", out, "--quantize",
               "4bit", "--rank", R, "--max-steps", 6, "--batch-size", 4, "--lr", 1e-2, "--eval-every", 3,
               "--quiet") == 0
    args = json.loads((out / "args.json").read_text())
    assert args["quantize"] == "4bit" and args["grad_mode"] == "sketch"
    evals = [m for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "eval_loss" in m]
    assert [m["step"] for m in evals] == [0, 3, 6] and evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    saved = load_file(out / "adapter_model.safetensors")
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    ids = torch.tensor([[5, 9, 12, 7, 20]])
    base_logits = base(ids).logits
    adapted = PeftModel.from_pretrained(base, out)  # stock PEFT, a float32 base
    loaded = {k: v for k, v in adapted.state_dict().items() if "lora_" in k}
    assert len(loaded) == len(saved) == 28
    for key, value in saved.items():
        assert torch.equal(loaded[key.replace(".weight", ".default.weight")], value), key
    with torch.no_grad():
        assert (adapted(ids).logits - base_logits).abs().max() > BUG * base_logits.abs().max()  # the adapter acts
    assert run("eval", "--model", base_dir, "--adapter", out, "--data", data, "--out", tmp_path / "e.json") == 0
    assert json.loads((tmp_path / "e.json").read_text())["n"] == 40  # on the float32 base
    # On the 4-bit base, over the run's held-out records in its batches (16): the run's own evaluation, the same
    # arithmetic on the same (deterministically quantised) weights, so its final numbers bit for bit. (Against
    # the float32 base the NF4 rounding, up to ~1/7 of a block's largest weight, changes the loss by no derivable
    # bound.)
    records = [json.loads(line) for line in data.read_text().splitlines()]
    held_out = tmp_path / "held_out.jsonl"
    held_out.write_text("".join(json.dumps(records[i]) + "\n" for i in _split(len(records), 0.25, args["seed"])[1]))
    assert run("eval", "--model", base_dir, "--adapter", out, "--data", held_out, "--out", tmp_path / "e4.json",
               "--quantize", "4bit") == 0
    four = json.loads((tmp_path / "e4.json").read_text())
    assert (four["loss"], four["accuracy"]) == (evals[-1]["eval_loss"], evals[-1]["eval_accuracy"])


@pytest.mark.parametrize("quantize", ["4bit", "8bit"])
def test_a_classifier_on_a_quantised_base_trains_its_head_and_evaluates_on_the_unquantised_one(quantize, tmp_path):
    """The fresh head stays unquantised (it trains in full); the run's adapter and head load on the float32 base."""
    base = tiny_bert(tmp_path / "bert")
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in sentiment_records(30)))
    out = tmp_path / "run"
    assert run("finetune", "--model", base, "--data", data, "--eval-split", 0.2, "--out", out, "--quantize",
               quantize, "--rank", 2, "--max-steps", 3, "--batch-size", 4, "--quiet") == 0
    heads = [k for k in load_file(out / "adapter_model.safetensors") if "classifier" in k]
    assert sorted(heads) == ["base_model.model.classifier.bias", "base_model.model.classifier.weight"]
    assert run("eval", "--model", base, "--adapter", out, "--data", data, "--out", tmp_path / "e.json") == 0
    assert json.loads((tmp_path / "e.json").read_text())["n"] == 30


def test_the_callback_initialises_a_4bit_model_in_a_trainer(base_dir, tok, examples, tmp_path):
    quantised, _, _ = load_model(str(base_dir), quantize="4bit")
    reference_q = full_finetuning_gradients(dequantised(base_dir, quantised), examples)
    step0 = Step0(DataCollatorForSeq2Seq(tok, padding=True))
    args = TrainingArguments(str(tmp_path), per_device_train_batch_size=3, max_steps=1, learning_rate=1e-3,
                             use_cpu=True, report_to=[], disable_tqdm=True, save_strategy="no", seed=0)
    trainer = Trainer(model=get_peft_model(quantised, LoraConfig(**LORA)), args=args,
                      train_dataset=Dataset.from_list(lm_rows(tok, N)),
                      data_collator=step0.collate,
                      callbacks=[LoraOneCallback(config=LoraOneConfig(init_samples=N, gamma=GAMMA, grad_mode="sketch",
                                                                      sketch_passes=3)), step0])
    trainer.train()
    factors = {n.removeprefix("base_model.model.").removesuffix(".lora_A.default.weight"):
               (step0.factors[n.replace(".lora_A.", ".lora_B.")], a)
               for n, a in step0.factors.items() if ".lora_A." in n}
    assert len(factors) == 14
    assert_lora_one_step0(factors, reference_q, gradient_tol(quantised, examples))
