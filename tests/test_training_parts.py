"""The parts under `finetune`: candidate scoring, label sets, settings from flags and config files, LoRA+, the probe."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import pytest
import torch
from numerics import assert_same_outputs
from peft import LoraConfig, get_peft_model
from tiny_models import TYPES, one_thread, question_records, tiny_bert, tiny_llama  # noqa: F401
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from lora_one.cli.args import add_settings, settings_from
from lora_one.core.errors import UsageError
from lora_one.core.optim import create_optimizer
from lora_one.recipes.data import prompt_ids, response_ids
from lora_one.recipes.evaluate import infer_choices, match_choices, score_candidates
from lora_one.recipes.probe import fit_logistic, probe_head
from lora_one.recipes.settings import required, setting


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    folder = tiny_llama(tmp_path_factory.mktemp("llama"))
    return AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


def naive_scores(model, prompts, cands):
    out = torch.empty(len(prompts), len(cands))
    with torch.no_grad():
        for i, p in enumerate(prompts):
            for j, c in enumerate(cands):
                logp = model(input_ids=torch.tensor([p + c])).logits[0].double().log_softmax(-1)
                out[i, j] = sum(logp[len(p) - 1 + k, t] for k, t in enumerate(c))
    return out


@pytest.mark.parametrize("shared_prefix", [True, False])
@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_score_candidates_equals_full_forward_per_pair(llama, shared_prefix, batch_size):
    model, tok = llama
    recs = question_records(7, seed=3)
    prompts = [prompt_ids(tok, r["prompt"] if shared_prefix else r["prompt"].removeprefix("question : ")) for r in recs]
    cands = [response_ids(tok, c) for c in (" human", " the river city", " of", " a king")]  # 2 to 4 tokens
    got = score_candidates(model, prompts, cands, batch_size=batch_size)
    # batched, cached prompts against one whole forward per pair: other arithmetic
    positions = max(len(p) for p in prompts) + max(len(c) for c in cands)
    assert_same_outputs(got, naive_scores(model, prompts, cands), model, positions)


def test_label_sets():
    assert infer_choices([" a", " b", " a", " b"]) == [" a", " b"]
    assert infer_choices([" a", " b", " c"]) is None  # every answer distinct: open-ended
    assert infer_choices([f" w{i}" for i in range(40)] * 3) is None  # too many labels
    assert match_choices(["human", "location"], [" human", " location"]) == [" human", " location"]
    with pytest.raises(ValueError, match="must occur in training"):
        match_choices([" human"], [" human", " number"])


@dataclass(kw_only=True)
class Toy:
    """Toy settings (for the test)."""

    model: str = required("the model")
    lr: float = setting(2e-4, "learning rate")
    steps: int = setting(10, "steps")
    flag: bool = setting(False, "a flag")
    cache: bool = setting(True, "on unless --no-cache", flag="--no-cache")
    kind: str = setting("a", "a kind", ("a", "b"))
    extra: str | None = setting(None, "optional")


def _parse(argv):
    return settings_from(add_settings(argparse.ArgumentParser(), Toy).parse_args(argv))


def test_settings_from_flags_then_config_then_defaults(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: m\nlr: 1e-3\nsteps: 5\nflag: true\ncache: false\n")
    got = _parse(["--config", str(cfg), "--steps", "10"])
    # 10 equals the default, but was typed: it wins over the file.
    assert got == Toy(model="m", lr=1e-3, steps=10, flag=True, cache=False, kind="a")
    assert _parse(["--model", "x", "--no-cache"]) == Toy(model="x", cache=False)
    for text, message in [("lr: fast\n", "valid float"), ("steps: 2.5\n", "integer"), ("kind: c\n", "not one of"),
                          ("flag: 1\n", "true or false"), ("speed: 3\n", "unknown setting"), ("- 1\n", "mapping")]:
        cfg.write_text("model: m\n" + text if not text.startswith("-") else text)
        with pytest.raises(UsageError, match=message):
            _parse(["--config", str(cfg)])
    with pytest.raises(UsageError, match="--model"):
        _parse([])


def test_lora_plus_and_preconditioned_optimizer(llama):
    model, _ = llama
    peft_model = get_peft_model(AutoModelForCausalLM.from_config(model.config), LoraConfig(r=2, target_modules=["q_proj"]))
    opt = create_optimizer(peft_model, lr=1e-3, lora_plus_ratio=16, precondition=True)
    names = {id(p): n for n, p in peft_model.named_parameters()}
    lrs = {g["lr"]: {".lora_B." in names[id(p)] for p in g["params"]} for g in opt.param_groups}
    assert lrs == {1e-3: {False}, 1.6e-2: {True}}
    assert "Riemannian" in type(opt).__name__


def test_probe_reaches_the_logistic_optimum(tmp_path):
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(200, 5, generator=gen)
    y = (X[:, 0] + 0.5 * torch.randn(200, generator=gen) > 0).long()
    W, b = fit_logistic(X, y, 2, l2=1e-2)
    W.requires_grad_(True)
    b.requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(X.double() @ W.T + b, y) + 0.5e-2 * (W * W).sum()
    gW, gb = torch.autograd.grad(loss, (W, b))
    # First-order optimality, as far as float64 L-BFGS is asked for: it stops once its quasi-Newton step's slope
    # g^T H_k g (H_k ~ H^-1) is below tolerance_change = 1e-12, so |g|^2 <= 1e-12 lambda_max(H), where
    # H <= lambda_max(X1^T X1 / n) / 2 + l2 (the softmax's Hessian diag(p) - p p^T stays below 1/2).
    X1 = torch.cat([X.double(), torch.ones(len(X), 1, dtype=torch.float64)], 1)
    bound = (1e-12 * (float(torch.linalg.eigvalsh(X1.T @ X1 / len(X))[-1]) / 2 + 1e-2)) ** 0.5
    assert max(gW.abs().max(), gb.abs().max()) <= bound  # a 1% error in W gives ~1e-2 |H W|: far above
    folder = tiny_bert(tmp_path / "bert")
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2)
    words = list(TYPES)
    feats = [{"input_ids": tok(f"{words[i % 3]} the city")["input_ids"], "labels": i % 2} for i in range(12)]
    before = model.classifier.weight.clone()
    info = probe_head(model, feats, tok.pad_token_id, n_samples=12, seed=0)
    assert info["probe_samples"] == 12 and not torch.equal(before, model.classifier.weight)
