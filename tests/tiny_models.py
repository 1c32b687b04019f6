"""Tiny randomly initialised models and toy data sets for fast CPU tests (no download, no package).

A word-level tokenizer over a fixed vocabulary; a 2-layer Llama (causal LM) and a 2-layer BERT
(sequence classification), each saved to a folder the way `lora-one --model FOLDER` expects.
"""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

SPECIAL = ["<pad>", "<unk>", "<eos>", "[CLS]"]
LORA = {"r": 4, "lora_alpha": 16, "use_rslora": True, "target_modules": "all-linear"}  # the tests' adapter
TYPES = {"who": "human", "where": "location", "when": "number"}
WORDS = ["what", "is", "the", "a", "of", "question", ":", "type", "?", "city", "river", "king", "year",
         "born", "built", "good", "bad", "great", "awful", "movie", "film", "plot", "fun", "dull",
         *TYPES, *TYPES.values(), "positive", "negative"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices: one thread is fastest, and on a shared CPU several threads can stall each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def save_tokenizer(folder: Path) -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(SPECIAL + sorted(set(WORDS)))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>")
    fast.save_pretrained(folder)
    return fast


def tiny_llama(folder: Path, seed: int = 0) -> Path:
    tok = save_tokenizer(folder)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None,
                         tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def tiny_bert(folder: Path, seed: int = 0) -> Path:
    tok = save_tokenizer(folder)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=64, pad_token_id=tok.pad_token_id)
    config.architectures = ["BertModel"]
    BertForSequenceClassification(config).save_pretrained(folder)
    return folder


def question_records(n: int, seed: int = 0) -> list[dict]:
    """Prompt/response pairs whose answer is fixed by the question word (learnable in a few steps)."""
    rng = random.Random(seed)
    recs = []
    for _ in range(n):
        wh = rng.choice(list(TYPES))
        body = " ".join(rng.choice(["the", "city", "river", "king", "year", "born", "built", "a", "of"])
                        for _ in range(rng.randint(2, 5)))
        recs.append({"prompt": f"question : {wh} {body} ? type :", "response": " " + TYPES[wh]})
    return recs


def sentiment_records(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    recs = []
    for _ in range(n):
        label = rng.choice(["positive", "negative"])
        cue = rng.choice(["good", "great", "fun"] if label == "positive" else ["bad", "awful", "dull"])
        words = [rng.choice(["the", "movie", "film", "plot", "is", "a"]) for _ in range(rng.randint(2, 5))]
        words.insert(rng.randrange(len(words) + 1), cue)
        recs.append({"text": " ".join(words), "label": label})
    return recs


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# Fixtures shared by several modules, which import them by their function names; `name=` keeps ruff
# from reading a test's argument as a redefinition of the import.


@pytest.fixture(scope="module", name="base_dir")
def tiny_llama_folder(tmp_path_factory) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="module", name="tok")
def tiny_llama_tokenizer(base_dir):
    return AutoTokenizer.from_pretrained(base_dir)


@pytest.fixture(scope="module", name="tiny")
def tiny_llama_and_questions(tmp_path_factory) -> dict:
    """The tiny Llama's folder and question files (24 to train on, 6 to evaluate), as `--model`/`--data` paths."""
    root = tmp_path_factory.mktemp("tiny")
    return {"llama": str(tiny_llama(root / "llama")), "qa": str(write_jsonl(root / "qa.jsonl", question_records(24))),
            "qa_eval": str(write_jsonl(root / "qa_eval.jsonl", question_records(6, seed=1)))}


def slow_conversion(root: Path):
    """A stand-in for `lora_one.recipes.models._convert_gguf` that logs its call (a line to root/conversions.log) and
    is slow, so that two processes are inside it at once unless something keeps the second one out; it
    publishes its folder by a rename, as a real save does. Set it in a forked child only."""

    def convert(gguf: Path, dest: Path) -> None:
        with open(root / "conversions.log", "a") as log:
            log.write(f"{os.getpid()}\n")
        time.sleep(1.0)
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}")
        tmp.mkdir(parents=True)
        (tmp / "config.json").write_text("{}")
        os.rename(tmp, dest)

    return convert
