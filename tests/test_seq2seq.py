"""Seq2seq (T5) as a task: a tiny random T5 built here and saved with SmolLM2's real tokenizer.

Each part is checked against an independent computation: the features against plain tokenisation,
the one-step gradient and the step-0 adapter (also the Trainer callback's) against a dense full
fine-tuning backward over the unpadded examples, candidate scores against one forward pass per
(prompt, candidate) pair, generation against a greedy loop written out by hand, the evaluation loss
against per-example cross-entropies, the saved and the merged model against the adapter in memory.
"""

from __future__ import annotations

import json
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from conftest import full_finetuning_gradients
from numerics import (
    assert_close_products,
    assert_same_outputs,
    gradient_tol,
    output_tol,
    products,
    relative_error,
)
from peft import LoraConfig, PeftModel, PeftModelForSeq2SeqLM, get_peft_model
from transformers import (
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    LlamaConfig,
    T5Config,
    T5ForConditionalGeneration,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from lora_one import LoraOneCallback, LoraOneConfig, estimate_gradients
from lora_one.core.errors import UsageError
from lora_one.core.init import get_lora_one_model
from lora_one.core.save import save_adapter
from lora_one.core.targets import lora_layers
from lora_one.recipes.data import (
    IGNORE_INDEX,
    Fields,
    collate,
    init_batches,
    init_sample_indices,
    prepare,
    read_records,
    seq2seq_features,
)
from lora_one.recipes.evaluate import (
    Seq2SeqEvaluator,
    choices_of,
    greedy_generate,
    make_evaluator,
    score_seq2seq_candidates,
)
from lora_one.recipes.merge import merge_adapter
from lora_one.recipes.models import PEFT_TASK_TYPES, SEQ2SEQ, infer_task, load_model

GAMMA, RANK = 16.0, 4
SENTENCES = ["a gripping, funny and moving film", "dull", "the plot drags and the jokes fall flat every time",
             "a small gem", "not worth the ticket", "warm and wise", "I wanted my two hours back"]
# GLUE's SST-2 in T5's text-to-text form: a task prefix, a word as the target
RECORDS = [{"prompt": f"sst2 sentence: {s}", "response": "positive" if i % 3 != 1 else "negative"}
           for i, s in enumerate(SENTENCES)]


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory, smollm2_dir):
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    torch.manual_seed(0)
    cfg = T5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                   pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                   decoder_start_token_id=tok.pad_token_id, architectures=["T5ForConditionalGeneration"])
    path = tmp_path_factory.mktemp("tiny_t5")
    T5ForConditionalGeneration(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tok(t5_dir):
    return AutoTokenizer.from_pretrained(t5_dir)


def fresh(t5_dir):
    return AutoModelForSeq2SeqLM.from_pretrained(t5_dir, dtype=torch.float32).eval()


def unpadded(features):
    return [{"input_ids": torch.tensor(f["input_ids"]), "labels": torch.tensor(f["labels"])} for f in features]


def lora_config():
    return LoraConfig(r=RANK, lora_alpha=16, use_rslora=True, target_modules="all-linear",
                      task_type=PEFT_TASK_TYPES[SEQ2SEQ])


# ------------------------------------------------------------------ task, loading, features


def test_encoder_decoders_are_seq2seq_and_other_conditional_generation_models_not(t5_dir, tmp_path):
    assert infer_task(t5_dir) == SEQ2SEQ
    model, _, task = load_model(str(t5_dir))
    assert isinstance(model, T5ForConditionalGeneration) and task == SEQ2SEQ
    # a decoder-only model that shares the name (vision-language models) keeps the old inference
    LlamaConfig(architectures=["LlavaForConditionalGeneration"]).save_pretrained(tmp_path)
    assert infer_task(tmp_path) != SEQ2SEQ


def test_features_encoder_prompt_decoder_response_padded_separately(tok):
    feats = seq2seq_features(RECORDS, tok, max_length=64)
    for r, f in zip(RECORDS, feats):
        assert f["input_ids"] == tok(r["prompt"])["input_ids"]
        assert f["labels"] == tok(r["response"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    batch = collate(feats[:3], tok.pad_token_id)
    widths = [len(f["input_ids"]) for f in feats[:3]], [len(f["labels"]) for f in feats[:3]]
    assert batch["input_ids"].shape == (3, max(widths[0])) and batch["labels"].shape == (3, max(widths[1]))
    assert batch["attention_mask"].sum(1).tolist() == widths[0]
    assert ((batch["labels"] != IGNORE_INDEX).sum(1)).tolist() == widths[1]
    assert prepare(RECORDS, tok, SEQ2SEQ, max_length=64) == feats
    # TRL's prompt/completion reads the same
    completion = [{"prompt": r["prompt"], "completion": r["response"]} for r in RECORDS]
    assert prepare(completion, tok, SEQ2SEQ, max_length=64) == feats
    with pytest.raises(UsageError, match="--chat-template wraps causal-LM prompts"):
        prepare(RECORDS, tok, SEQ2SEQ, max_length=64, chat_template=True)


def test_a_long_prompt_loses_its_end_and_keeps_the_tokenizers_end_token(minilm_dir):
    """MiniLM's tokenizer frames a text with [CLS] ... [SEP]; a cut prompt keeps its [SEP]."""
    tok = AutoTokenizer.from_pretrained(minilm_dir)
    tok.eos_token = "[SEP]"  # the decoder's targets need an end token
    records = [{"prompt": "sst2 sentence: " + " ".join(["word"] * 20), "response": "positive " * 10},
               {"prompt": "sst2 sentence: short", "response": "negative"}]
    feats = seq2seq_features(records, tok, max_length=8)
    assert feats[0]["input_ids"] == tok(records[0]["prompt"], truncation=True, max_length=8)["input_ids"]
    assert feats[0]["input_ids"][-1] == tok.sep_token_id and len(feats[0]["labels"]) == 8
    assert feats[1]["input_ids"] == tok(records[1]["prompt"])["input_ids"]
    assert feats.note == ("truncated 1 of 2 records longer than --max-length 8 tokens (cut the end of 1 prompt(s) and "
                          "1 response(s)); --too-long skip or error instead")
    assert seq2seq_features(records, tok, max_length=8, too_long="skip").kept == [1]


# ------------------------------------------------------------------ gradient, init, callback, merge


def test_one_step_gradient_is_the_dense_full_batch_step(t5_dir, tok):
    """Five ragged examples in micro-batches of 1, 2 (a short last batch) and 5: one gradient, the mean
    cross-entropy over all 5 examples' decoder label tokens, none of them shifted away."""
    model = fresh(t5_dir)
    feats = seq2seq_features(RECORDS[:5], tok, 64)
    reference = full_finetuning_gradients(model, unpadded(feats), "seq2seq")
    for batch_size in (1, 2, 5):
        batches = [collate(feats[i : i + batch_size], tok.pad_token_id) for i in range(0, 5, batch_size)]
        grads = estimate_gradients(model, batches, show_progress_bar=False, init_samples=None)
        assert len(grads) == 32  # every Linear of 2 encoder and 2 decoder blocks; not the LM head
        for name, g in grads.items():
            rel, tol = relative_error(g, reference[name]), gradient_tol(model, unpadded(feats))
            assert rel <= tol, (batch_size, name, rel, tol)


def test_sketch_mode_on_t5_equals_the_dense_gradients_top_subspace(t5_dir, tok):
    """T5's encoder and decoder embed through modules of their own over the shared weight: the sketch
    must start its graph at both. With sketches as wide as each layer the sketch's SVD is exact: the
    float32 sketch holds G + E with |E| <= tol |G|, so its top-r SVD errs from G by at most the exact
    truncation's error + 2 |E| (the best rank-r approximation of G + E is no farther from G + E than
    G_r is), and each singular value moves by at most |E| (Weyl)."""
    model = fresh(t5_dir)
    feats = seq2seq_features(RECORDS[:5], tok, 64)
    reference = full_finetuning_gradients(model, unpadded(feats), "seq2seq")
    batches = [collate(feats[i : i + 2], tok.pad_token_id) for i in range(0, 5, 2)]
    sketched = estimate_gradients(model, batches, show_progress_bar=False, init_samples=None, grad_mode="sketch",
                                  rank=RANK, oversample=64)
    assert len(sketched) == 32 and sketched.keys() <= reference.keys()  # every Linear but the LM head
    tol = gradient_tol(model, unpadded(feats))
    for name, svd in sketched.items():
        G = reference[name]
        S = torch.linalg.svdvals(G)
        best = S[RANK:].square().sum().sqrt()  # the error of the exact top-r SVD (ties make the subspace moot)
        E = tol * G.norm()
        got = (G - svd.U.double() @ torch.diag(svd.S.double()) @ svd.Vh.double()).norm()
        assert got <= best + 2 * E, (name, float(got), float(best), float(E))
        torch.testing.assert_close(svd.S.double(), S[:RANK], rtol=0, atol=float(E))


@pytest.fixture(scope="module")
def adapter(t5_dir, tok, tmp_path_factory):
    """The LoRA-One step-0 adapter on 5 init samples, after 6 steps of AdamW, saved."""
    model = fresh(t5_dir)
    feats = seq2seq_features(RECORDS, tok, 64)
    batches = init_batches(feats, 5, 2, seed=0, pad_id=tok.pad_token_id)  # 2 + 2 + 1
    drawn = unpadded([feats[i] for i in init_sample_indices(len(feats), 5, seed=0)])
    reference = full_finetuning_gradients(model, drawn, "seq2seq")
    peft_model = get_lora_one_model(model, lora_config(), batches, show_progress_bar=False,
                                    config=LoraOneConfig(gamma=GAMMA, init_samples=None))
    step0 = products(peft_model)
    batch = collate(feats, tok.pad_token_id)
    losses = []
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    peft_model.train()
    for _ in range(6):
        loss = peft_model(**batch).loss
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    peft_model.eval()
    out = tmp_path_factory.mktemp("adapter")
    save_adapter(peft_model, out, extra={"model": str(t5_dir), "task": SEQ2SEQ})
    return {"model": peft_model, "step0": step0, "reference": reference, "drawn": drawn, "losses": losses, "out": out,
            "batch": batch}


def test_init_is_the_formula_and_training_lowers_the_loss(adapter):
    assert isinstance(adapter["model"], PeftModelForSeq2SeqLM)
    rel = gradient_tol(adapter["model"], adapter["drawn"])
    assert_close_products(adapter["step0"], adapter["reference"], RANK, GAMMA, rel)
    assert adapter["losses"][-1] < adapter["losses"][0] - 0.5, adapter["losses"]


def test_saved_and_merged_models_compute_what_the_adapter_does(adapter, t5_dir, tmp_path):
    config = json.loads((adapter["out"] / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_2_SEQ_LM"
    with torch.no_grad():
        expected = adapter["model"](**adapter["batch"]).logits
        loaded = PeftModel.from_pretrained(fresh(t5_dir), adapter["out"]).eval()
        assert torch.equal(loaded(**adapter["batch"]).logits, expected)  # the same weights, the same arithmetic
        merged = AutoModelForSeq2SeqLM.from_pretrained(merge_adapter(str(t5_dir), adapter["out"], tmp_path / "m")).eval()
        positions = adapter["batch"]["input_ids"].shape[1] + adapter["batch"]["labels"].shape[1]
        assert_same_outputs(merged(**adapter["batch"]).logits, expected, merged, positions)


def token_loss(outputs, labels, num_items_in_batch=None):
    """The summed token cross-entropy over the label tokens of the whole optimizer step."""
    total = F.cross_entropy(outputs.logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                            reduction="sum")
    return total / (num_items_in_batch if num_items_in_batch is not None else (labels != IGNORE_INDEX).sum())


def test_decoder_inputs_for_a_loss_outside_the_model(t5_dir, tok, tmp_path):
    """T5's own loss is the mean over its micro-batch and ignores the Trainer's `num_items_in_batch`:
    with `collate(..., decoder_start_id)` and a token-summed `compute_loss_func`, 2 accumulated
    micro-batches of 2 step exactly as one batch of 4 (plain SGD, lr 1, no dropout)."""
    model = fresh(t5_dir)
    feats = seq2seq_features(RECORDS[:4], tok, 64)
    start = model.config.decoder_start_token_id
    batch = collate(feats, tok.pad_token_id, decoder_start_id=start)
    with torch.no_grad():
        own = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        given = model(**{k: v for k, v in batch.items() if k != "labels"})
    assert torch.equal(given.logits, own.logits)  # the same decoder inputs, built in two places

    def step(batch_size, accumulate):
        base = AutoModelForSeq2SeqLM.from_pretrained(t5_dir, dropout_rate=0.0)
        torch.manual_seed(0)
        peft_model = get_peft_model(base, lora_config())
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.02)  # so that lora_A takes a gradient too
        before = {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}
        args = TrainingArguments(str(tmp_path / f"{batch_size}"), per_device_train_batch_size=batch_size,
                                 gradient_accumulation_steps=accumulate, max_steps=1, learning_rate=1.0, optim="sgd",
                                 lr_scheduler_type="constant", max_grad_norm=0, use_cpu=True, report_to=[],
                                 save_strategy="no", disable_tqdm=True, seed=0)
        Trainer(model=peft_model, args=args, train_dataset=feats, compute_loss_func=token_loss,
                data_collator=partial(collate, pad_id=tok.pad_token_id, decoder_start_id=start)).train()
        return torch.cat([(before[n] - p.detach()).flatten() for n, p in peft_model.named_parameters()
                          if p.requires_grad])

    whole, accumulated = step(4, 1), step(2, 2)
    assert relative_error(accumulated, whole) <= 2 * gradient_tol(model, unpadded(feats))  # two float32 steps


class _Phase(TrainerCallback):
    """Before LoraOneCallback: batches are the init's; after it: keeps the step-0 factors."""

    def __init__(self, recorder, phase):
        self.recorder, self.phase = recorder, phase

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.recorder.phase = self.phase
        self.factors = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


class _PhaseAfter(_Phase):
    """The same, as a class of its own: a Trainer warns about two callbacks of one class."""


def test_trainer_callback_step0_on_t5(t5_dir, tok, tmp_path):
    """A stock Trainer over our features and collate, batches of 3: the callback's step-0 adapter is the
    formula for the 5 examples it drew (a sliced second batch), as a dense backward computes it."""
    batches = []

    def recorder(features):
        batch = collate(features, tok.pad_token_id)
        batches.append((recorder.phase, batch))
        return batch

    recorder.phase = "before"
    peft_model = get_peft_model(fresh(t5_dir), lora_config())
    phases = [_Phase(recorder, "init"), LoraOneCallback(config=LoraOneConfig(init_samples=5, gamma=GAMMA)),
              _PhaseAfter(recorder, "train")]
    args = TrainingArguments(str(tmp_path), per_device_train_batch_size=3, max_steps=1, learning_rate=1e-3,
                             use_cpu=True, report_to=[], dataloader_num_workers=0, save_strategy="no",
                             disable_tqdm=True, seed=0)
    Trainer(model=peft_model, args=args, train_dataset=seq2seq_features(RECORDS, tok, 64), data_collator=recorder,
            callbacks=phases).train()
    drawn = []
    for phase, b in batches:
        if phase == "init":
            for ids, mask, labels in zip(b["input_ids"], b["attention_mask"], b["labels"]):
                drawn.append({"input_ids": ids[mask.bool()], "labels": labels[labels != IGNORE_INDEX]})
    reference = full_finetuning_gradients(fresh(t5_dir), drawn[:5], "seq2seq")  # the second batch sliced to 2
    assert len(drawn) >= 5
    assert_close_products(products(phases[2].factors), reference, RANK, GAMMA, gradient_tol(peft_model, drawn[:5]))


# ------------------------------------------------------------------ evaluation


def greedy_by_hand(model, prompt, max_new, eos):
    dec = [model.config.decoder_start_token_id]
    with torch.no_grad():
        for _ in range(max_new):
            nxt = int(model(input_ids=torch.tensor([prompt]), decoder_input_ids=torch.tensor([dec])).logits[0, -1].argmax())
            dec.append(nxt)
            if nxt == eos:
                break
    return dec


def test_closed_label_accuracy_is_the_best_decoder_log_likelihood(adapter, tok):
    model = adapter["model"]
    records = RECORDS * 2
    choices = choices_of(records, SEQ2SEQ)
    assert choices == ["negative", "positive"]
    evaluator = make_evaluator(SEQ2SEQ, records, tok, Fields(), 64, choices=choices, batch_size=4)
    assert isinstance(evaluator, Seq2SeqEvaluator) and evaluator.metric == "accuracy"
    cands = [tok(c, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for c in choices]
    scores = torch.empty(len(records), 2)
    with torch.no_grad():
        for i, r in enumerate(records):
            for j, c in enumerate(cands):
                logits = model(input_ids=torch.tensor([tok(r["prompt"])["input_ids"]]), labels=torch.tensor([c])).logits
                scores[i, j] = logits[0].log_softmax(-1).gather(-1, torch.tensor(c)[:, None]).sum()
    positions = max(len(p) for p in evaluator.prompts) + max(len(c) for c in cands)
    assert_same_outputs(score_seq2seq_candidates(model, evaluator.prompts, cands, batch_size=4), scores, model, positions)
    gold = torch.tensor([choices.index(r["response"]) for r in records])
    result = evaluator(model)
    assert result["accuracy"] == pytest.approx((scores.argmax(1) == gold).float().mean().item())
    n_tokens = sum(len(cands[g]) for g in gold.tolist())
    assert result["loss"] == pytest.approx(-scores.gather(1, gold[:, None]).sum().item() / n_tokens,
                                           rel=2 * output_tol(model, positions, n_tokens))


def test_open_ended_exact_match_and_loss(adapter, tok):
    model = adapter["model"]
    records = [dict(r, response=f"{r['response']} {i}") for i, r in enumerate(RECORDS)]  # all distinct: open-ended
    assert choices_of(records, SEQ2SEQ) is None
    evaluator = make_evaluator(SEQ2SEQ, records, tok, Fields(), 64, batch_size=3)
    assert evaluator.metric == "exact_match"
    # batched generation (prompts right-padded for the encoder) against a loop over one prompt at a time, on
    # the random base model, whose continuations are long and varied (the trained one ends at once)
    base = model.get_base_model()
    with model.disable_adapter():
        by_hand = tok.batch_decode([greedy_by_hand(base, p, 6, tok.eos_token_id) for p in evaluator.prompts],
                                   skip_special_tokens=True)
        assert greedy_generate(model, tok, evaluator.prompts, 6, batch_size=3) == by_hand
    assert all(by_hand)
    by_hand = [tok.decode(greedy_by_hand(model, p, evaluator.max_new, tok.eos_token_id), skip_special_tokens=True)
               for p in evaluator.prompts]
    total, count = 0.0, 0
    with torch.no_grad():
        for f in seq2seq_features(records, tok, 64):
            logits = model(input_ids=torch.tensor([f["input_ids"]]), labels=torch.tensor([f["labels"]])).logits[0]
            total += F.cross_entropy(logits, torch.tensor(f["labels"]), reduction="sum").item()
            count += len(f["labels"])
    result = evaluator(model)
    positions = max(len(f["input_ids"]) + len(f["labels"]) for f in seq2seq_features(records, tok, 64))
    assert result["loss"] == pytest.approx(total / count, rel=2 * output_tol(model, positions, count))
    assert result["exact_match"] == sum(t.strip() == r["response"] for t, r in zip(by_hand, records)) / len(records)
    with pytest.raises(UsageError, match=r"All 7 records are longer than --max-length 3 tokens \(evaluation never"):
        make_evaluator(SEQ2SEQ, records, tok, Fields(), 3)


def test_seq2seq_records_from_a_file(tmp_path, tok):
    path = tmp_path / "sst2.jsonl"
    path.write_text("".join(json.dumps({"prompt": r["prompt"], "completion": r["response"]}) + "\n" for r in RECORDS))
    records = read_records(path, SEQ2SEQ)
    assert prepare(records, tok, SEQ2SEQ, max_length=64) == seq2seq_features(RECORDS, tok, 64)
    with pytest.raises(UsageError, match="lacks field"):
        read_records(path, SEQ2SEQ, Fields(prompt="input"))
