"""Seq2seq targets with the tokenizer's own special tokens (issue 23): BART's `<s> ... </s>`, T5's
`... </s>`, each checked against the tokenizer's `text_target=` encoding; a tokenizer that ends no
target with eos (SmolLM2's, on the tests' T5) gets it appended. Tokenizers built here from a small
vocabulary (no download); a tiny random BART trained and evaluated on them through the command line."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel
from transformers import AutoTokenizer, BartConfig, BartForConditionalGeneration, BartTokenizer, T5Tokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

from lora_one.cli import main
from lora_one.recipes.data import Fields, seq2seq_features, target_ids
from lora_one.recipes.evaluate import make_evaluator
from lora_one.recipes.models import SEQ2SEQ, infer_task

WORDS = ["review:", "a", "good", "film", "dull", "plot", "warm", "and", "wise", "positive", "negative"]
RECORDS = [{"prompt": f"review: {text}", "response": label} for text, label in [
    ("a good film", "positive"), ("dull plot", "negative"), ("warm and wise", "positive"), ("a dull film", "negative"),
    ("good plot", "positive"), ("dull and dull", "negative")]]


def bart_tokenizer() -> BartTokenizer:
    """BART's byte-level BPE over the 256 byte symbols, with merges that make each word one token."""
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for symbol in bytes_to_unicode().values():
        vocab.setdefault(symbol, len(vocab))
    merges = []
    for word in WORDS:
        for piece in (word, "\u0120" + word):  # with and without the space before it
            for end in range(2, len(piece) + 1):
                merges.append((piece[: end - 1], piece[end - 1]))
                vocab.setdefault(piece[:end], len(vocab))
    vocab["<mask>"] = len(vocab)
    return BartTokenizer(vocab=vocab, merges=list(dict.fromkeys(merges)))


def t5_tokenizer() -> T5Tokenizer:
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + w, -1.0) for w in WORDS] + [(c, -3.0) for c in "abcdefghijklmnopqrstuvwxyz:"]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


@pytest.fixture(scope="module")
def tokenizers(smollm2_dir):
    return {"bart": bart_tokenizer(), "t5": t5_tokenizer(), "smollm2": AutoTokenizer.from_pretrained(smollm2_dir)}


def test_the_test_tokenizers_are_what_they_stand_for(tokenizers):
    bart, t5 = tokenizers["bart"], tokenizers["t5"]
    assert bart(text_target="positive")["input_ids"] == [bart.bos_token_id, bart.convert_tokens_to_ids("positive"),
                                                          bart.eos_token_id]
    assert t5(text_target="positive")["input_ids"] == [t5.convert_tokens_to_ids("\u2581positive"), t5.eos_token_id]


@pytest.mark.parametrize("kind", ["bart", "t5", "smollm2"])
def test_targets_are_the_tokenizers_own_target_encoding(tokenizers, kind):
    tok = tokenizers[kind]
    feats = seq2seq_features(RECORDS, tok, max_length=64)
    for r, f in zip(RECORDS, feats):
        want = tok(text_target=r["response"])["input_ids"]
        if kind == "smollm2":  # a decoder-only model's tokenizer ends no target with eos
            want = want + [tok.eos_token_id]
        assert f["labels"] == want and f["input_ids"] == tok(r["prompt"])["input_ids"]
        assert target_ids(tok, r["response"]) == want
    assert target_ids(tok, "")[-1] == tok.eos_token_id  # an empty response: eos (BART: <s> </s>)
    # closed-label evaluation scores the same targets
    evaluator = make_evaluator(SEQ2SEQ, RECORDS, tok, Fields(), 64, choices=["negative", "positive"])
    assert evaluator.cand_ids == [target_ids(tok, c) for c in ("negative", "positive")]


@pytest.fixture(scope="module")
def bart_dir(tmp_path_factory):
    tok = bart_tokenizer()
    torch.manual_seed(0)
    config = BartConfig(vocab_size=len(tok), d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=64,
                        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                        decoder_start_token_id=tok.eos_token_id, forced_bos_token_id=tok.bos_token_id, dropout=0.0,
                        architectures=["BartForConditionalGeneration"])
    path = tmp_path_factory.mktemp("tiny_bart")
    BartForConditionalGeneration(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_bart_trains_and_evaluates_on_its_own_targets(bart_dir, tmp_path):
    """finetune and eval on a BART: the held-out loss and accuracy are those of the decoder's
    log-likelihoods of the targets `text_target=` encodes (<s> included), computed here one at a time."""
    assert infer_task(bart_dir) == SEQ2SEQ
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS * 4))
    run = tmp_path / "run"
    assert main(["finetune", "--model", str(bart_dir), "--data", str(data), "--out", str(run), "--rank", "2",
                 "--init-samples", "4", "--batch-size", "4", "--max-steps", "2", "--lr", "1e-2", "--max-length", "32",
                 "--quiet"]) == 0
    assert main(["eval", "--model", str(bart_dir), "--adapter", str(run), "--data", str(data), "--max-length", "32",
                 "--out", str(tmp_path / "eval.json")]) == 0
    got = json.loads((tmp_path / "eval.json").read_text())
    tok = AutoTokenizer.from_pretrained(bart_dir)
    model = PeftModel.from_pretrained(BartForConditionalGeneration.from_pretrained(bart_dir), str(run)).eval()
    labels = ["negative", "positive"]
    gold_logp, gold_tokens, hits = 0.0, 0, 0
    with torch.no_grad():
        for r in RECORDS * 4:
            scores = []
            for label in labels:
                target = torch.tensor([tok(text_target=label)["input_ids"]])
                logits = model(input_ids=torch.tensor([tok(r["prompt"])["input_ids"]]), labels=target).logits[0]
                scores.append(-F.cross_entropy(logits, target[0], reduction="sum").item())
            gold = labels.index(r["response"])
            hits += max(range(2), key=scores.__getitem__) == gold
            gold_logp += scores[gold]
            gold_tokens += len(tok(text_target=r["response"])["input_ids"])
    assert got["metric"] == "accuracy" and got["n"] == len(RECORDS) * 4
    assert got["accuracy"] == pytest.approx(hits / got["n"])
    assert got["loss"] == pytest.approx(-gold_logp / gold_tokens, rel=1e-5)
