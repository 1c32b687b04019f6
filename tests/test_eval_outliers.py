"""Real data's outliers (issue 23): an evaluation record whose response alone exceeds --max-length is
skipped and counted, not fatal (printed, in the run's summary, in compare's summary.json, in eval.json);
every other record keeps its own room, as in training; an empty response is a target of eos alone.
Checked against the tokenizer's own encoding of each record and a greedy loop written out by hand."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from tiny_models import one_thread, tiny_llama, tiny_llama_folder, tiny_llama_tokenizer, write_jsonl  # noqa: F401
from transformers import AutoModelForCausalLM

from lora_one.cli import main
from lora_one.core.errors import UsageError
from lora_one.recipes.compare import CompareSettings, run_compare
from lora_one.recipes.data import (
    IGNORE_INDEX,
    Fields,
    causal_lm_features,
    check_records,
    prepare,
    read_records,
    resolve_format,
)
from lora_one.recipes.evaluate import CausalLMEvaluator, make_evaluator
from lora_one.recipes.models import CAUSAL_LM, CLASSIFICATION

MAX = 16
LONG = " " + " ".join(["the city river"] * 8)  # 24 words + eos: alone over --max-length 16
HELD_OUT = [
    {"prompt": "question : who is the king ? type :", "response": " the king"},  # fits: 9 + 3 tokens
    {"prompt": "question : " + " ".join(["the river"] * 8) + " ? type :", "response": " a city"},  # 21 + 3: cut
    {"prompt": "question : where ?", "response": LONG},  # the outlier: never cut, skipped
    {"prompt": "question : when ?", "response": " the year of the king born a city"},  # 4 + 9: fits whole
]
SKIPPED_NOTE = ("skipped 1 of 4 records whose response alone does not fit in --max-length 16 tokens (evaluation "
                "never cuts a reference: a cut one would change the metric)")


def encoded(tok, record) -> tuple[list[int], list[int]]:
    """The tokenizer's own encoding of a prompt, and of a response followed by eos."""
    return (tok(record["prompt"])["input_ids"],
            tok(record["response"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id])


def greedy(model, prompt: list[int], new_tokens: int, eos: int) -> list[int]:
    out = []
    with torch.no_grad():
        for _ in range(new_tokens):
            t = int(model(input_ids=torch.tensor([prompt + out])).logits[0, -1].argmax())
            if t == eos:
                break
            out.append(t)
    return out


def test_a_response_longer_than_max_length_is_skipped_the_others_keep_their_own_room(base_dir, tok):
    evaluator = make_evaluator(CAUSAL_LM, HELD_OUT, tok, Fields(), MAX)
    assert isinstance(evaluator, CausalLMEvaluator) and evaluator.metric == "exact_match"
    assert evaluator.note == ("truncated 1 of 4 records longer than --max-length 16 tokens (cut the prompt's start); "
                              f"{SKIPPED_NOTE}; --too-long skip or error instead")
    assert evaluator.features.kept == [0, 1, 3]
    expected = []
    for i in evaluator.features.kept:  # each prompt leaves room for its own response, whole, as in training
        p, r = encoded(tok, HELD_OUT[i])
        p = p[-(MAX - len(r)):]
        expected.append({"input_ids": p + r, "labels": [IGNORE_INDEX] * len(p) + r})
    assert list(evaluator.features) == expected
    assert len(expected[1]["input_ids"]) == MAX and expected[2]["input_ids"][:4] == encoded(tok, HELD_OUT[3])[0]
    # generation: each record as many new tokens as its reference has, in batches that fit the positions
    budgets = {i: len(encoded(tok, HELD_OUT[k])[1]) for i, k in enumerate(evaluator.features.kept)}
    rows = sorted(i for batch, _ in evaluator.generation_batches for i in batch)
    assert rows == [0, 1, 2]
    for batch, new_tokens in evaluator.generation_batches:
        assert new_tokens == max(budgets[i] for i in batch)
        assert max(len(evaluator.prompts[i]) for i in batch) + new_tokens <= MAX
    model = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    result = evaluator(model)
    hits = sum(tok.decode(greedy(model, evaluator.prompts[i], budgets[i], tok.eos_token_id)).strip()
               == HELD_OUT[k]["response"].strip() for i, k in enumerate(evaluator.features.kept))
    assert (result["n"], result["exact_match_n"], result["exact_match"]) == (3, 3, hits / 3)
    # the other policies: skip drops every record over the limit, error names the first
    skipped = make_evaluator(CAUSAL_LM, HELD_OUT, tok, Fields(), MAX, too_long="skip")
    assert skipped.features.kept == [0, 3]
    assert skipped.note == ("skipped 2 of 4 records longer than --max-length 16 tokens; --too-long truncate or error "
                            "instead")
    with pytest.raises(UsageError, match="^Record 1 has 24 tokens, more than --max-length 16; raise --max-length"):
        make_evaluator(CAUSAL_LM, HELD_OUT, tok, Fields(), MAX, too_long="error")
    # a closed label set is not an outlier: a candidate that cannot fit is still refused
    with pytest.raises(UsageError, match="An evaluation candidate has 25 tokens"):
        make_evaluator(CAUSAL_LM, HELD_OUT, tok, Fields(), MAX, choices=[r["response"] for r in HELD_OUT])


def copy_records(n: int, seed: int) -> list[dict]:
    """Open-ended prompt/response records (the answer repeats the question's words): exact match."""
    import random

    rng = random.Random(seed)
    recs = []
    for _ in range(n):
        body = " ".join(rng.choice(["the", "city", "river", "king", "year", "born", "built"]) for _ in range(3))
        recs.append({"prompt": f"question : {body} ? type :", "response": " " + body})
    return recs


def test_compare_and_eval_finish_and_report_the_skipped_outlier(tmp_path, capsys):
    """An evaluation file with one long reference among 7: compare runs (it stopped before any run), prints
    the count, and keeps it in summary.json beside the run's training counts; `eval` writes it to eval.json."""
    llama = str(tiny_llama(tmp_path / "llama"))
    train = write_jsonl(tmp_path / "train.jsonl", copy_records(24, seed=0))
    val = write_jsonl(tmp_path / "val.jsonl", [*copy_records(6, seed=1), {"prompt": "question : where ?",
                                                                           "response": LONG + LONG}])
    out = tmp_path / "cmp"
    settings = CompareSettings(model=llama, data=str(train), eval_data=str(val), out=str(out), rank=4, init_samples=4,
                               batch_size=4, max_steps=2, eval_every=2, seeds=1, lr_grid="1e-2", max_length=32,
                               quiet=True)
    summary = run_compare(settings, {"lora": None})
    note = ("skipped 1 of 7 records whose response alone does not fit in --max-length 32 tokens (evaluation never "
            "cuts a reference: a cut one would change the metric); --too-long skip or error instead")
    assert f"{val}: {note}" in capsys.readouterr().out.splitlines()
    run = summary["methods"]["lora"]["runs"][0]
    assert run["data_notes"] == {"evaluation": note} and run["final_eval"]["eval_n"] == 6
    written = json.loads((out / "summary.json").read_text())
    assert written["methods"]["lora"]["runs"][0]["data_notes"] == run["data_notes"]
    assert f"- evaluation data: {note}" in (out / "report.md").read_text()
    adapter = next((out / "val" / "lora").glob("*/seed-0"))
    assert main(["eval", "--model", llama, "--adapter", str(adapter), "--data", str(val), "--max-length", "32",
                 "--out", str(tmp_path / "eval.json")]) == 0
    assert json.loads((tmp_path / "eval.json").read_text())["data_notes"] == {"evaluation": note}


def test_an_empty_response_is_a_target_of_eos_alone(tok, tmp_path):
    # from a CSV, whose empty cell is an empty string: read, detected, checked, encoded
    path = tmp_path / "qa.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, ["prompt", "response"])
        writer.writeheader()
        writer.writerows([{"prompt": "question : who ?", "response": ""}, {"prompt": "question : where ?",
                                                                           "response": " city"}])
    records = read_records(path, CAUSAL_LM)
    assert records[0]["response"] == ""
    feats = prepare(records, tok, CAUSAL_LM, max_length=MAX)
    p, eos = tok("question : who ?")["input_ids"], tok.eos_token_id
    assert feats[0] == {"input_ids": p + [eos], "labels": [IGNORE_INDEX] * len(p) + [eos]}
    assert feats[1] == causal_lm_features(records[1:], tok, MAX)[0]
    assert feats.note == ("1 of 2 records have an empty response: the target is eos alone (the model learns to end "
                          "its answer right after the prompt)")
    # TRL's name for the response is told apart when the first one is empty
    assert resolve_format([{"prompt": "q", "completion": ""}], CAUSAL_LM).response == "completion"


@pytest.mark.parametrize("record, task, message", [
    ({"prompt": "", "response": "r"}, CAUSAL_LM,
     "Record 0 of 'd.jsonl' has an empty 'prompt' field, which causal-lm as prompt-response needs; fill it in or "
     "drop the record (an empty response is fine: its target is eos alone)."),
    ({"text": "good film", "label": ""}, CLASSIFICATION,
     "Record 0 of 'd.jsonl' has an empty 'label' field, which classification as text-label needs; fill it in or "
     "drop the record."),
])
def test_other_empty_fields_are_refused_as_empty_not_missing(record, task, message):
    with pytest.raises(UsageError) as e:
        check_records([record], task, Fields(), "d.jsonl")
    assert str(e.value) == message
