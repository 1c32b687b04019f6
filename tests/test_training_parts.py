"""The parts under `finetune`: candidate scoring, label sets, config files, data order, LoRA+, the probe."""

from __future__ import annotations

import argparse

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tiny_models import TYPES, one_thread, question_records, tiny_bert, tiny_llama  # noqa: F401
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from lora_one.config import config_aware, resolve
from lora_one.data import collate, loss_terms, prompt_ids, response_ids
from lora_one.errors import UsageError
from lora_one.evaluate import infer_choices, match_choices, score_candidates
from lora_one.probe import fit_logistic, probe_head
from lora_one.train import BatchOrder, TrainSettings, build_optimizer, rank_share


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
    torch.testing.assert_close(got, naive_scores(model, prompts, cands), atol=1e-4, rtol=1e-5)


def test_label_sets():
    assert infer_choices([" a", " b", " a", " b"]) == [" a", " b"]
    assert infer_choices([" a", " b", " c"]) is None  # every answer distinct: open-ended
    assert infer_choices([f" w{i}" for i in range(40)] * 3) is None  # too many labels
    assert match_choices(["human", "location"], [" human", " location"]) == [" human", " location"]
    with pytest.raises(ValueError, match="must occur in training"):
        match_choices([" human"], [" human", " number"])


def _parser():
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--flag", action="store_true")
    p.add_argument("--kind", choices=("a", "b"), default="a")
    return config_aware(p)


def test_config_precedence_and_checks(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: m\nlr: 1e-3\nsteps: 5\nflag: true\n")
    args = resolve(_parser().parse_args(["--config", str(cfg), "--steps", "10"]))
    # 10 equals the default, but was typed: it wins over the file.
    assert (args.model, args.lr, args.steps, args.flag, args.kind) == ("m", 1e-3, 10, True, "a")
    assert resolve(_parser().parse_args(["--model", "x"])).lr == 2e-4
    for text, message in [("lr: fast\n", "valid float"), ("steps: 2.5\n", "integer"), ("kind: c\n", "not one of"),
                          ("flag: 1\n", "true or false"), ("speed: 3\n", "unknown setting"), ("- 1\n", "mapping")]:
        cfg.write_text("model: m\n" + text if not text.startswith("-") else text)
        with pytest.raises(UsageError, match=message):
            resolve(_parser().parse_args(["--config", str(cfg)]))
    with pytest.raises(UsageError, match="--model"):
        resolve(_parser().parse_args([]))


def test_batch_order_is_seeded_epochs_of_permutations():
    order = BatchOrder(10, batch_size=4, seed=7)
    epoch = [i for m in range(3) for i in order[m]]
    assert sorted(epoch) == list(range(10)) and order.per_epoch == 3 and len(order[2]) == 2
    again = BatchOrder(10, batch_size=4, seed=7)
    assert all(order[m] == again[m] for m in (5, 1, 4))  # random access
    other = BatchOrder(10, batch_size=4, seed=8)
    assert any(order[m] != other[m] for m in range(3))


def test_loss_terms_count_what_the_model_loss_averages(llama):
    model, _ = llama
    feats = [{"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8]},
             {"input_ids": [9, 10, 11], "labels": [9, -100, 11]}]  # the first label is never predicted
    assert [loss_terms(f) for f in feats] == [2, 1] and loss_terms({"input_ids": [1], "labels": 2}) == 1
    with torch.no_grad():
        mean = model(**collate(feats, pad_id=0)).loss
        sums = [model(**collate([f], pad_id=0)).loss * loss_terms(f) for f in feats]
    torch.testing.assert_close(mean, sum(sums) / 3)


def test_rank_shares_add_up_to_the_step_loss(llama):
    """Rebuild the mean loss of a step of two micro-batches (grad_accum = 2) from each rank's weighted
    part of each micro-batch, as DDP averages it."""
    model, _ = llama
    g = torch.Generator().manual_seed(0)
    feats = [{"input_ids": ids, "labels": [-100] * n + ids[n:]}
             for ids, n in ((torch.randint(1, 30, (L,), generator=g).tolist(), L // 2) for L in (5, 9, 7, 12, 6))]
    micro = [[3, 0, 4], [1, 2]]
    step_terms = sum(loss_terms(f) for f in feats)
    with torch.no_grad():
        whole = model(**collate(feats, pad_id=0)).loss
        for world in (1, 2, 3, 7):
            parts = []
            for idx in micro:
                for rank in range(world):
                    mine, weight = rank_share(feats, idx, rank, world, step_terms)
                    parts.append(model(**collate(mine, pad_id=0)).loss * weight)
                    assert weight > 0 or rank >= len(idx)  # only a rank without examples idles
            torch.testing.assert_close(sum(parts) / world, whole)
    with pytest.raises(ValueError, match="no tokens to predict"):
        rank_share([{"input_ids": [1, 2], "labels": [1, -100]}], [0], 0, 2, 1)


def test_lora_plus_and_preconditioned_optimizer(llama):
    model, _ = llama
    peft_model = get_peft_model(AutoModelForCausalLM.from_config(model.config), LoraConfig(r=2, target_modules=["q_proj"]))
    opt = build_optimizer(peft_model, TrainSettings(lr=1e-3, lora_plus_ratio=16, precondition=True))
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
    assert gW.abs().max() < 1e-6 and gb.abs().max() < 1e-6  # first-order optimality
    folder = tiny_bert(tmp_path / "bert")
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2)
    words = list(TYPES)
    feats = [{"input_ids": tok(f"{words[i % 3]} the city")["input_ids"], "labels": i % 2} for i in range(12)]
    before = model.classifier.weight.clone()
    info = probe_head(model, feats, tok.pad_token_id, n_samples=12, seed=0)
    assert info["probe_samples"] == 12 and not torch.equal(before, model.classifier.weight)
