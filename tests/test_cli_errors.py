"""Bad input ends in one line `lora-one <cmd>: error: ...` and exit code 2; real-world data loads.

Tiny models (tests/tiny_models.py: 64 positions) and hand-written data files. The positive tests
check what was read or encoded against an independent reading (the csv/json modules, the
tokenizer's own truncation) and the evaluation of over-long records against plain forward passes.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
import torch
from numerics import output_tol
from peft import PeftModel
from tiny_models import one_thread, question_records, sentiment_records, tiny_bert, tiny_llama, write_jsonl  # noqa: F401
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from lora_one.cli import main
from lora_one.recipes.data import causal_lm_features, classification_features, prompt_ids, read_records, response_ids

LONG_PROMPT = "question : " + " ".join(["the city river"] * 30) + " ? type :"  # 95 tokens: over 64 positions
LONG_TEXT = " ".join(["the good movie"] * 30)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    qa = question_records(24, seed=0)
    paths = {
        "root": root,
        "llama": str(tiny_llama(root / "llama")),
        "bert": str(tiny_bert(root / "bert")),
        "qa": str(write_jsonl(root / "qa.jsonl", qa)),
        "qa_eval": str(write_jsonl(root / "qa_eval.jsonl", question_records(6, seed=1))),
        "sent": str(write_jsonl(root / "sent.jsonl", sentiment_records(24, seed=0))),
        "qa_long": str(write_jsonl(root / "qa_long.jsonl", qa[:11] + [{"prompt": LONG_PROMPT, "response": " human"}])),
        "empty": str(write_text(root / "empty.jsonl", "")),
        "latin1": str(write_bytes(root / "latin1.csv", "prompt,response\ncaf\xe9 ?,human\n".encode("latin-1"))),
        "nofield": str(write_jsonl(root / "nofield.jsonl", [{"question": "who ?", "answer": "human"}])),
        "unseen_qa": str(write_jsonl(root / "unseen_qa.jsonl", [{"prompt": "question : who ? type :", "response": " city"}])),
        "unseen_cls": str(write_jsonl(root / "unseen_cls.jsonl", [{"text": "good movie", "label": "neutral"}])),
        "file": str(write_text(root / "file.txt", "mine")),
    }
    return paths


@pytest.fixture(scope="module")
def cls_run(tiny):
    """A classification run (its adapter carries the label names eval needs)."""
    out = tiny["root"] / "cls_run"
    assert main(["finetune", "--model", tiny["bert"], "--data", tiny["sent"], "--out", str(out), "--rank", "2",
                 "--init-samples", "4", "--batch-size", "4", "--max-steps", "1", "--quiet"]) == 0
    return str(out)


def write_text(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def write_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def command(cmd: str, tiny: dict, out: Path) -> list[str]:
    """A valid command line of `cmd` on the tiny causal LM; a case appends flags, which override these."""
    if cmd == "init":
        return ["init", "--model", tiny["llama"], "--data", tiny["qa"], "--out", str(out), "--rank", "2",
                "--init-samples", "4"]
    if cmd == "finetune":
        return ["finetune", "--model", tiny["llama"], "--data", tiny["qa"], "--eval-data", tiny["qa_eval"],
                "--out", str(out), "--rank", "2", "--init-samples", "4", "--batch-size", "4", "--max-steps", "1",
                "--quiet"]
    return ["eval", "--model", tiny["llama"], "--data", tiny["qa_eval"], "--out", str(out / "eval.json")]


def assert_one_error_line(code: int, err: str, cmd: str, message: str) -> None:
    lines = [line for line in err.splitlines() if "error:" in line]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"lora-one {cmd}: error: "), lines[0]
    assert message in lines[0], lines[0]


ALL, TRAIN = ("init", "finetune", "eval"), ("init", "finetune")
# (commands, flags appended to the valid command line (names from the fixture), message)
CASES = {
    "out is a file": (TRAIN, ["--out", "{file}"], "is a file, not a folder"),
    "out under a file": (ALL, ["--out", "{file}/sub"], "is a file, so nothing can be made under it"),
    "device foo": (ALL, ["--device", "foo"], "--device 'foo' is not a device"),
    "rank 0": (TRAIN, ["--rank", "0"], "--rank must be >= 1"),
    "rank negative": (TRAIN, ["--rank=-2"], "--rank must be >= 1"),
    "alpha negative": (TRAIN, ["--alpha=-16"], "--alpha must be > 0"),
    "alpha 0": (TRAIN, ["--alpha", "0"], "--alpha must be > 0"),
    "gamma 0": (TRAIN, ["--gamma", "0"], "gamma must be a positive number"),
    "gamma negative": (TRAIN, ["--gamma=-1"], "gamma must be a positive number"),
    "lr 0": (("finetune",), ["--lr", "0"], "learning rate"),
    "lr negative": (("finetune",), ["--lr=-1e-3"], "learning rate"),
    "init samples 0": (TRAIN, ["--init-samples", "0"], "init_samples must be an integer >= 1"),
    "init batch size 0": (TRAIN, ["--init-batch-size", "0"], "--init-batch-size must be >= 1"),
    "init samples above the data": (TRAIN, ["--init-samples", "25"], "exceeds the 24 training records"),
    "sketch passes 0": (TRAIN, ["--grad-mode", "sketch", "--sketch-passes", "0"],
                        "sketch_passes must be an integer >= 1"),
    "sketch passes without sketch": (TRAIN, ["--grad-mode", "accumulate", "--sketch-passes", "3"],
                                     "sketch_passes=3 needs grad_mode='sketch'"),
    "max length 1": (TRAIN, ["--max-length", "1"], "--max-length must be >= 2"),
    "no target": (TRAIN, ["--target", " , "], "names no module"),
    "chat template without one": (ALL, ["--chat-template"], "tokenizer has no chat template"),
    "max length above the positions": (ALL, ["--max-length", "65"], "exceeds the model's 64 positions"),
    "empty file": (ALL, ["--data", "{empty}"], "holds no records"),
    "not UTF-8": (ALL, ["--data", "{latin1}"], "is not UTF-8 text (byte 0xe9"),
    "missing fields": (ALL, ["--data", "{nofield}"], "lacks field(s) ['prompt', 'response']"),
    "too long, error": (ALL, ["--data", "{qa_long}", "--too-long", "error"], "Record 11 has 97 tokens, more than --max-length 64"),
    "eval responses unseen in training": (("finetune",), ["--eval-data", "{unseen_qa}"], "must occur in training"),
}


@pytest.mark.parametrize("cmd, case", [(cmd, case) for case, (cmds, _, _) in CASES.items() for cmd in cmds])
def test_bad_input_is_one_line_and_exit_2(cmd, case, tiny, tmp_path, capsys):
    _, flags, message = CASES[case]
    out = tmp_path / "out"
    code = main(command(cmd, tiny, out) + [f.format(**tiny) for f in flags])
    assert_one_error_line(code, capsys.readouterr().err, cmd, message)
    assert not out.exists()


@pytest.mark.parametrize("cmd", ALL)
def test_device_cuda_without_cuda(cmd, tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    code = main(command(cmd, tiny, tmp_path / "out") + ["--device", "cuda"])
    assert_one_error_line(code, capsys.readouterr().err, cmd, "use --device cpu (or auto)")


@pytest.mark.parametrize("cmd", ALL)
def test_out_in_a_folder_without_write_permission(cmd, tiny, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("this user (root) may write in a read-only folder")
        code = main(command(cmd, tiny, locked / "out"))
        assert_one_error_line(code, capsys.readouterr().err, cmd, "no permission to write in")
    finally:
        locked.chmod(0o700)


def test_eval_out_naming_a_folder_is_refused_before_evaluating(tiny, tmp_path, capsys):
    code = main(["eval", "--model", tiny["llama"], "--data", tiny["qa_eval"], "--out", str(tmp_path)])
    assert_one_error_line(code, capsys.readouterr().err, "eval", "is a folder; give the path of a JSON file")


def test_eval_labels_unseen_in_training(tiny, cls_run, capsys):
    code = main(["eval", "--model", tiny["bert"], "--adapter", cls_run, "--data", tiny["unseen_cls"]])
    assert_one_error_line(code, capsys.readouterr().err, "eval", "'neutral' (record 0) never occurs in the training data")
    code = main(["finetune", "--model", tiny["bert"], "--data", tiny["sent"], "--eval-data", tiny["unseen_cls"],
                 "--out", str(Path(cls_run).parent / "unseen"), "--quiet"])
    assert_one_error_line(code, capsys.readouterr().err, "finetune", "never occurs in the training data")


def test_internal_bugs_keep_their_traceback(tiny, tmp_path, monkeypatch):
    """Only UsageError becomes one line: a bug (here a ValueError from inside the gradient phase) propagates."""
    import lora_one.recipes.runs

    def bug(*args, **kwargs):
        raise ValueError("an internal bug")

    monkeypatch.setattr(lora_one.recipes.runs, "get_lora_one_model", bug)
    with pytest.raises(ValueError, match="an internal bug"):
        main(command("init", tiny, tmp_path / "out"))


# ------------------------------------------------------------------ real-world files that must load


def test_csv_with_a_byte_order_mark_and_a_json_array_load(tiny, tmp_path, capsys):
    rows = sentiment_records(6, seed=3)
    bom = tmp_path / "excel.csv"
    with bom.open("w", encoding="utf-8-sig", newline="") as f:  # what spreadsheet programs write
        writer = csv.DictWriter(f, ["text", "label"])
        writer.writeheader()
        writer.writerows(rows)
    assert bom.read_bytes().startswith(b"\xef\xbb\xbftext")
    array = write_text(tmp_path / "array.json", json.dumps(rows, indent=2))
    assert read_records(bom, "classification") == rows
    assert read_records(array, "classification") == rows
    # JSON Lines whose strings hold a line separator (U+2028), which str.splitlines would split on
    odd = [{"text": "good\u2028movie", "label": "positive"}, {"text": "bad", "label": "negative"}]
    lines = write_text(tmp_path / "odd.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in odd))
    assert read_records(lines, "classification") == odd
    assert main(["init", "--model", tiny["bert"], "--data", str(bom), "--out", str(tmp_path / "a"), "--rank", "2",
                 "--init-samples", "4"]) == 0
    assert main(["init", "--model", tiny["bert"], "--data", str(array), "--out", str(tmp_path / "b"), "--rank", "2",
                 "--init-samples", "4"]) == 0
    assert "error" not in capsys.readouterr().err


# ------------------------------------------------------------------ records longer than --max-length


def test_truncation_keeps_the_response_and_the_end_of_the_prompt(tiny):
    tok = AutoTokenizer.from_pretrained(tiny["llama"])
    records = [{"prompt": LONG_PROMPT, "response": " human"}, {"prompt": "question : who ? type :", "response": " human"},
               {"prompt": "question : who ?", "response": " " + " ".join(["the city river"] * 30)}]
    feats = causal_lm_features(records, tok, 32)
    p0, r0 = tok(LONG_PROMPT)["input_ids"], tok(" human", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert feats[0]["input_ids"] == p0[-(32 - len(r0)):] + r0
    assert feats[0]["labels"] == [-100] * (32 - len(r0)) + r0
    p1 = tok(records[1]["prompt"])["input_ids"]
    assert feats[1]["input_ids"] == p1 + r0  # fits: untouched
    # a response longer than --max-length on its own: one prompt token (the first token is never
    # predicted), then the response's start
    p2, r2 = tok(records[2]["prompt"])["input_ids"], tok(records[2]["response"], add_special_tokens=False)["input_ids"]
    assert feats[2]["input_ids"] == p2[-1:] + r2[:31] and feats[2]["labels"] == [-100] + r2[:31]
    assert feats.kept == [0, 1, 2]
    assert feats.note == ("truncated 2 of 3 records longer than --max-length 32 tokens (cut the prompt's start; the "
                          "response's end too in 1); --too-long skip or error instead")
    skipped = causal_lm_features(records, tok, 32, too_long="skip")
    assert skipped.kept == [1] and list(skipped) == [feats[1]]
    assert skipped.note.startswith("skipped 2 of 3 records longer than --max-length 32 tokens;")


def test_classification_text_loses_its_end_and_is_counted(tiny):
    tok = AutoTokenizer.from_pretrained(tiny["bert"])
    records = [{"text": LONG_TEXT, "label": "positive"}, {"text": "good movie", "label": "positive"}]
    feats = classification_features(records, tok, 16, {"positive": 0})
    assert feats[0]["input_ids"] == tok(LONG_TEXT, truncation=True, max_length=16)["input_ids"]
    assert feats[1]["input_ids"] == tok("good movie")["input_ids"]
    assert feats.note.startswith("truncated 1 of 2 records longer than --max-length 16 tokens (cut the text's end)")


@pytest.mark.parametrize("cmd", ["init", "finetune"])
def test_one_over_long_record_no_longer_loses_the_run(cmd, tiny, tmp_path, capsys):
    """12 records, one prompt over --max-length: truncated by default with one line saying so;
    `--too-long skip` drops it (init then has 11 records to draw from)."""
    out = tmp_path / "out"
    base = command(cmd, tiny, out) + ["--data", tiny["qa_long"], "--max-length", "32"]
    assert main(base) == 0
    printed = capsys.readouterr().out
    notes = [line for line in printed.splitlines() if "--max-length" in line]
    assert notes == [(f"{tiny['qa_long']}: truncated 1 of 12 records longer than --max-length 32 tokens (cut the "
                      "prompt's start); --too-long skip or error instead")]
    assert main(base + ["--out", str(tmp_path / "skip"), "--too-long", "skip"]) == 0
    assert f"{tiny['qa_long']}: skipped 1 of 12 records" in capsys.readouterr().out
    code = main(base + ["--out", str(tmp_path / "skip12"), "--too-long", "skip", "--init-samples", "12"])
    assert_one_error_line(code, capsys.readouterr().err, cmd, "--init-samples 12 exceeds the 11 training records")


def test_eval_prompt_longer_than_the_model_positions(tiny, tmp_path, capsys):
    """A 95-token prompt on a 64-position model: eval truncates its start, says so, and scores what
    plain forward passes over the truncated prompt give."""
    eval_recs = question_records(3, seed=2) + [{"prompt": LONG_PROMPT, "response": " location"}]
    data = write_jsonl(tmp_path / "long_eval.jsonl", eval_recs)
    res = tmp_path / "eval.json"
    assert main(["eval", "--model", tiny["llama"], "--data", str(data), "--choices", "human,location,number",
                 "--out", str(res)]) == 0
    assert f"{data}: truncated 1 of 4 records longer than --max-length 64 tokens" in capsys.readouterr().out
    result = json.loads(res.read_text())
    tok = AutoTokenizer.from_pretrained(tiny["llama"])
    model = AutoModelForCausalLM.from_pretrained(tiny["llama"]).eval()
    cands = [response_ids(tok, " " + c) for c in ("human", "location", "number")]
    room = max(len(c) for c in cands)  # every prompt leaves room for the longest candidate
    hits, gold_logp, gold_tokens = 0, 0.0, 0
    with torch.no_grad():
        for r in eval_recs:
            p = prompt_ids(tok, r["prompt"])[-(64 - room):]
            scores = []
            for c in cands:
                logp = model(input_ids=torch.tensor([p + c])).logits[0].log_softmax(-1)
                scores.append(sum(logp[len(p) - 1 + i, t].item() for i, t in enumerate(c)))
            gold = ["human", "location", "number"].index(r["response"].strip())
            hits += max(range(3), key=scores.__getitem__) == gold
            gold_logp, gold_tokens = gold_logp + scores[gold], gold_tokens + len(cands[gold])
    assert result["n"] == 4 and result["accuracy"] == pytest.approx(hits / 4)
    # batched and padded against each pair alone, over up to 64 positions: two float32 losses within output_tol
    assert result["loss"] == pytest.approx(-gold_logp / gold_tokens, rel=2 * output_tol(model, 64, gold_tokens))


def test_eval_text_longer_than_the_model_positions(tiny, cls_run, tmp_path, capsys):
    """BERT has absolute positions (it crashed on a longer text); the text is truncated as the tokenizer
    truncates it, and the accuracy is that of plain forward passes."""
    recs = [{"text": LONG_TEXT, "label": "positive"}, {"text": "awful dull plot", "label": "negative"}]
    data = write_jsonl(tmp_path / "long_cls.jsonl", recs)
    res = tmp_path / "eval.json"
    assert main(["eval", "--model", tiny["bert"], "--adapter", cls_run, "--data", str(data), "--out", str(res)]) == 0
    assert "truncated 1 of 2 records longer than --max-length 64 tokens (cut the text's end)" in capsys.readouterr().out
    tok = AutoTokenizer.from_pretrained(tiny["bert"])
    label2id = json.loads((Path(cls_run) / "lora_one.json").read_text())["label2id"]
    base = AutoModelForSequenceClassification.from_pretrained(tiny["bert"], num_labels=len(label2id))
    model = PeftModel.from_pretrained(base, cls_run).eval()
    with torch.no_grad():
        hits = sum(int(model(**tok(r["text"], truncation=True, max_length=64, return_tensors="pt")).logits.argmax())
                   == label2id[r["label"]] for r in recs)
    assert json.loads(res.read_text())["accuracy"] == pytest.approx(hits / 2)


def test_default_max_length_is_the_model_positions_when_fewer(tiny, tmp_path):
    """256 tokens by default, but never more than the model has positions (64 here): recorded in args.json."""
    out = tmp_path / "run"
    assert main(command("finetune", tiny, out)) == 0
    assert json.loads((out / "args.json").read_text())["max_length"] == 64


def test_missing_fields_message_names_the_flags_that_fix_it(tiny, tmp_path, capsys):
    """The missing-field message names the flags that rename the fields, and they work."""
    renamed = [{"question": r["prompt"], "answer": r["response"]} for r in question_records(6)]
    data = str(write_jsonl(tmp_path / "renamed.jsonl", renamed))
    code = main(command("init", tiny, tmp_path / "a") + ["--data", data])
    assert_one_error_line(code, capsys.readouterr().err, "init", "--prompt-field/--response-field")
    assert main(command("init", tiny, tmp_path / "b") + ["--data", data, "--prompt-field", "question",
                                                          "--response-field", "answer"]) == 0
