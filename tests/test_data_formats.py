"""Data files read with `datasets`, record formats told apart by their fields, and the features of each
format checked against independent encodings: the csv/json/pyarrow modules for what was read, the
tokenizer's own `apply_chat_template` and plain tokenisation of each assistant turn for conversations
(SmolLM2's real template), and per-example forward passes for the evaluation loss."""

from __future__ import annotations

import csv
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from numerics import output_tol
from transformers import AutoModelForCausalLM, AutoTokenizer

from lora_one.core.errors import UsageError
from lora_one.recipes.data import (
    IGNORE_INDEX,
    MESSAGES,
    PROMPT_RESPONSE,
    TEXT,
    TEXT_LABEL,
    Fields,
    causal_lm_features,
    check_records,
    collate,
    end_of_turn,
    load_records,
    messages_features,
    prepare,
    read_records,
    resolve_format,
    text_features,
)
from lora_one.recipes.evaluate import LossEvaluator, choices_of, make_evaluator

ROWS = [
    {"text": "a plain line", "label": "007"},  # CSV: a number-looking value stays text as written
    {"text": "NA", "label": "null"},  # ... and so do pandas' missing-value words
    {"text": "comma, \"quoted\" and caf\u00e9", "label": "x"},
    {"text": "line\nbreak", "label": "y"},
]

CHAT = [
    {"messages": [
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris"},
        {"role": "user", "content": "And of Italy?"},
        {"role": "assistant", "content": " Rome, of course.\nAnything else?"},
        {"role": "user", "content": "No, thanks."},  # after the last assistant turn: no loss, dropped
    ]},
    {"messages": [  # no system turn: SmolLM2's template adds its default one
        {"role": "user", "content": "Say hi"},
        {"role": "assistant", "content": "Hi! \U0001f44b"},
    ]},
]


@pytest.fixture(scope="module")
def smol_tok(smollm2_dir):
    return AutoTokenizer.from_pretrained(smollm2_dir)


def write_csv(path, rows, delimiter=",", bom=False):
    with path.open("w", encoding="utf-8-sig" if bom else "utf-8", newline="") as f:
        writer = csv.DictWriter(f, list(rows[0]), delimiter=delimiter)
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


# ------------------------------------------------------------------ files


def test_every_file_kind_reads_the_same_records(tmp_path):
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "d.parquet")
    files = {
        "jsonl": write_jsonl(tmp_path / "d.jsonl", ROWS),
        "array": tmp_path / "d.json",
        "csv with a BOM": write_csv(tmp_path / "d.csv", ROWS, bom=True),
        "tsv": write_csv(tmp_path / "d.tsv", ROWS, delimiter="\t"),
        "parquet": tmp_path / "d.parquet",
    }
    files["array"].write_text(json.dumps(ROWS, indent=2), encoding="utf-8")
    assert files["csv with a BOM"].read_bytes().startswith(b"\xef\xbb\xbftext,")
    for kind, path in files.items():
        assert load_records(path) == ROWS, kind
    # JSON Lines with blank lines and a U+2028 inside a string (str.splitlines would split there)
    odd = [{"text": "good\u2028movie", "label": "a"}, {"text": "bad", "label": "b"}]
    lines = tmp_path / "odd.jsonl"
    lines.write_text(json.dumps(odd[0], ensure_ascii=False) + "\n\n" + json.dumps(odd[1]) + "\n", encoding="utf-8")
    assert read_records(lines, "classification") == odd


@pytest.mark.parametrize("content, message", [
    ("", "holds no records"),
    ("\ufeff\n", "holds no records"),
    ("[]", "holds no records"),
    ('{"prompt": "a",\n', "Cannot parse"),
])
def test_unreadable_json_is_one_line(content, message, tmp_path):
    path = tmp_path / "d.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(UsageError, match=message) as e:
        load_records(path)
    assert "\n" not in str(e.value) and "d.json" in str(e.value)


def test_csv_header_alone_broken_parquet_and_other_suffixes(tmp_path):
    (tmp_path / "h.csv").write_text("text,label\n")
    (tmp_path / "b.parquet").write_bytes(b"PAR1 not really")
    (tmp_path / "d.txt").write_text("x")
    for name, message in [("h.csv", "holds no records"), ("b.parquet", "Cannot read .* as Parquet"),
                          ("d.txt", "use a .jsonl file"), ("missing.jsonl", "does not exist")]:
        with pytest.raises(UsageError, match=message):
            load_records(tmp_path / name)


def test_not_utf8_names_the_byte_and_its_offset_past_the_first_chunk(tmp_path):
    """The check reads 1 MiB at a time: a bad byte after a multi-byte character split across two chunks."""
    head = "text,label\n" + "a" * ((1 << 20) - 12) + "\u00e9"  # the two bytes of é straddle the chunk boundary
    data = head.encode() + b",x\ncaf\xe9,y\n"
    (tmp_path / "d.csv").write_bytes(data)
    with pytest.raises(UsageError, match=f"byte 0xe9 at offset {data.index(b'caf') + 3}\\)"):
        load_records(tmp_path / "d.csv")


def test_hub_data_sets_are_named_with_config_and_split(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, config=None, split=None):
        calls.append((name, config, split))
        if name == "offline/set":
            raise ConnectionError("Couldn't reach 'offline/set' on the Hub (LocalEntryNotFoundError)\nmore detail")
        return datasets.Dataset.from_list(ROWS)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert load_records("hub:nyu-mll/glue:sst2@validation") == ROWS
    assert load_records("hub:imdb") == ROWS
    assert calls == [("nyu-mll/glue", "sst2", "validation"), ("imdb", None, "train")]
    with pytest.raises(UsageError, match=r"Cannot load the Hub data set 'offline/set' .*Couldn't reach .*online") as e:
        load_records("hub:offline/set@test")
    assert "\n" not in str(e.value)
    with pytest.raises(UsageError, match="hub:NAME"):
        load_records("hub:")


# ------------------------------------------------------------------ formats


@pytest.mark.parametrize("record, task, fmt, response", [
    ({"prompt": "p", "response": "r"}, "causal-lm", PROMPT_RESPONSE, "response"),
    ({"prompt": "p", "completion": "r"}, "causal-lm", PROMPT_RESPONSE, "completion"),  # TRL
    ({"prompt": "p", "completion": "r"}, "seq2seq", PROMPT_RESPONSE, "completion"),
    ({"messages": CHAT[1]["messages"], "prompt": "Say hi"}, "causal-lm", MESSAGES, "response"),  # e.g. UltraChat
    ({"text": "t"}, "causal-lm", TEXT, "response"),
    ({"text": "t", "label": "l"}, "classification", TEXT_LABEL, "response"),
])
def test_the_format_follows_from_the_fields(record, task, fmt, response):
    fields = resolve_format([record], task)
    assert (fields.format, fields.response) == (fmt, response)


def test_forced_formats_and_refusals():
    assert resolve_format([{"text": "t", "label": "l"}], "causal-lm", Fields(format=TEXT)).format == TEXT
    with pytest.raises(UsageError, match="classification data, but the task is causal-lm: pass --task classification"):
        resolve_format([{"text": "t", "label": "l"}], "causal-lm")
    with pytest.raises(UsageError, match="--format messages is not a seq2seq format; use prompt-response"):
        resolve_format([{"messages": []}], "seq2seq", Fields(format=MESSAGES))
    with pytest.raises(UsageError) as e:
        check_records([{"question": "q", "answer": "a"}], "causal-lm", Fields(), "d.jsonl")
    assert str(e.value) == (
        "Record 0 of 'd.jsonl' lacks field(s) ['prompt', 'response'] needed for causal-lm as prompt-response (it has "
        "['answer', 'question']). Rename the fields in the file, name them with --prompt-field/--response-field, or "
        "give another --format: messages (field 'messages'); text (field 'text')."
    )


@pytest.mark.parametrize("messages, message", [
    ("hi", "must be a list of {role, content} objects, not str"),
    ([{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}], "message 1 has role 'bot'; use system"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": None}], "message 1 is not an object with"),
    ([{"role": "user", "content": "q"}], "has no assistant turn"),
    ([{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}], "starts with an assistant turn"),
])
def test_malformed_conversations_are_refused(messages, message):
    with pytest.raises(UsageError, match=message):
        check_records([CHAT[1], {"messages": messages}], "causal-lm", Fields(), "chat.jsonl")


# ------------------------------------------------------------------ conversations on SmolLM2's template


def expected_labelled(tok, conversation, closing_id):
    """What the loss must see: each assistant turn's content tokenised on its own, then the template's
    end-of-turn token."""
    out = []
    for m in conversation:
        if m["role"] == "assistant":
            out += tok(m["content"], add_special_tokens=False)["input_ids"] + [closing_id]
    return out


def test_smollm2_conversations_mask_all_but_the_assistant_turns_and_im_end(smol_tok):
    tok = smol_tok
    assert end_of_turn(tok) == "<|im_end|>"
    im_start, im_end = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    header = tok("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    feats = messages_features(CHAT, tok, max_length=256)
    assert feats.kept == [0, 1] and feats.note is None
    tails = ["\n<|im_start|>user\nNo, thanks.<|im_end|>\n", "\n"]
    for record, f, tail in zip(CHAT, feats, tails):
        full = tok.apply_chat_template(record["messages"], tokenize=True)["input_ids"]
        ids, labels = f["input_ids"], f["labels"]
        assert ids == full[: len(ids)]  # the template's own tokens, up to the last assistant turn's <|im_end|>
        assert ids[-1] == im_end
        assert tok.decode(full[len(ids) :]) == tail  # dropped: what follows the last assistant turn
        kept = [t for t in labels if t != IGNORE_INDEX]
        assert kept == expected_labelled(tok, record["messages"], im_end)
        assert all(lab in (IGNORE_INDEX, t) for t, lab in zip(ids, labels))
        # one run of labels per assistant turn, right after its header "<|im_start|>assistant\n"
        runs = [i for i in range(len(labels)) if labels[i] != IGNORE_INDEX and (i == 0 or labels[i - 1] == IGNORE_INDEX)]
        assert len(runs) == sum(m["role"] == "assistant" for m in record["messages"])
        assert all(ids[i - len(header) : i] == header for i in runs)
        assert im_start not in kept


def test_a_template_that_ends_turns_with_another_token_than_eos(smollm2_dir):
    """A template closing assistant turns with <|endoftext|> (id 0) while eos is <|im_end|>: the loss ends
    each turn with the template's token, never with eos."""
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'user' %}User: {{ m['content'] }}\n"
                         "{% else %}Bot: {{ m['content'] }}<|endoftext|>\n{% endif %}{% endfor %}"
                         "{% if add_generation_prompt %}Bot:{% endif %}")
    eot = tok.convert_tokens_to_ids("<|endoftext|>")
    assert end_of_turn(tok) == "<|endoftext|>" and eot != tok.eos_token_id
    conv = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
            {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]
    (f,) = messages_features([{"messages": conv}], tok, 64)
    # the generation prompt is "Bot:", so the space before each answer is the model's to write
    spaced = [{**m, "content": " " + m["content"]} for m in conv]
    assert [t for t in f["labels"] if t != IGNORE_INDEX] == expected_labelled(tok, spaced, eot)
    assert tok.eos_token_id not in f["input_ids"]
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    with pytest.raises(UsageError, match="ends an assistant turn with nothing but whitespace"):
        end_of_turn(tok)
    tok.chat_template = None
    with pytest.raises(UsageError, match="has none; use a chat model"):
        messages_features([{"messages": conv}], tok, 64)


def test_long_conversations_lose_their_start_or_are_skipped(smol_tok):
    full = messages_features(CHAT, smol_tok, 256)
    n = len(full[0]["input_ids"])
    cut = messages_features(CHAT, smol_tok, 20)
    assert cut.kept == [0, 1] and cut.note.startswith(
        "truncated 2 of 2 records longer than --max-length 20 tokens (cut the conversation's start)")
    assert cut[0] == {"input_ids": full[0]["input_ids"][n - 20 :], "labels": full[0]["labels"][n - 20 :]}
    short = len(full[1]["input_ids"])
    skipped = messages_features(CHAT, smol_tok, short, too_long="skip")
    assert skipped.kept == [1] and list(skipped) == [full[1]]
    with pytest.raises(UsageError, match="Record 0 has"):
        messages_features(CHAT, smol_tok, short, too_long="error")


def test_messages_from_a_file_with_keys_only_some_messages_have(tmp_path, smol_tok):
    """datasets gives every message every key any message has (None where absent); templates must not see them."""
    rows = [{"messages": [{"role": "user", "content": "q", "name": "ann"}, {"role": "assistant", "content": "a"}]},
            CHAT[1]]
    records = read_records(write_jsonl(tmp_path / "chat.jsonl", rows), "causal-lm")
    feats = prepare(records, smol_tok, "causal-lm", max_length=128)
    assert [f["input_ids"] for f in feats] == [f["input_ids"] for f in messages_features(rows, smol_tok, 128)]


# ------------------------------------------------------------------ plain text, prompt/completion, padding


def test_plain_text_predicts_every_token_and_padding_never(smol_tok):
    tok = smol_tok
    records = [{"text": "The quick brown fox jumps over the lazy dog."}, {"text": "Short."}]
    feats = text_features(records, tok, 64)
    for r, f in zip(records, feats):
        ids = tok(r["text"])["input_ids"] + [tok.eos_token_id]
        assert f == {"input_ids": ids, "labels": ids}
    assert tok.pad_token_id == tok.eos_token_id  # SmolLM2 pads with its eos: labels must tell them apart
    batch = collate(list(feats), tok.pad_token_id)
    n0, n1 = len(feats[0]["input_ids"]), len(feats[1]["input_ids"])
    assert batch["labels"][1, n1 - 1] == tok.eos_token_id and (batch["labels"][1, n1:] == IGNORE_INDEX).all()
    assert batch["attention_mask"].sum(1).tolist() == [n0, n1]
    cut = text_features(records, tok, 5)
    assert cut[0]["input_ids"] == tok(records[0]["text"])["input_ids"][:5] and cut.note.startswith("truncated 1 of 2")


def test_trl_prompt_completion_trains_like_prompt_response(smol_tok):
    pr = [{"prompt": "Question: who? Type:", "response": " human"}, {"prompt": "Where?", "response": " location"}]
    pc = [{"prompt": r["prompt"], "completion": r["response"]} for r in pr]
    assert list(prepare(pc, smol_tok, "causal-lm", max_length=64)) == list(causal_lm_features(pr, smol_tok, 64))
    assert choices_of(pc * 2, "causal-lm") == [" human", " location"]
    assert choices_of(CHAT, "causal-lm") is None and choices_of(pc, "causal-lm", given="a,b") == ["a", "b"]


def test_text_and_conversation_evaluation_is_the_token_weighted_loss(tiny_llama_dir, smol_tok):
    """LossEvaluator over ragged examples in batches of 2 (a short last batch) equals the summed
    cross-entropy of every predicted token, each example run alone, over their number."""
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    records = [{"text": "one two three four five six"}, {"text": "seven"}, {"text": "eight nine ten"}]
    for recs in (records, CHAT):
        evaluator = make_evaluator("causal-lm", recs, smol_tok, Fields(), 128, batch_size=2)
        assert isinstance(evaluator, LossEvaluator) and evaluator.metric == "loss"
        total, count, positions = 0.0, 0, 0
        for f in prepare(recs, smol_tok, "causal-lm", max_length=128):
            positions = max(positions, len(f["input_ids"]))
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([f["input_ids"]])).logits[0, :-1]
            target = torch.tensor(f["labels"][1:])
            total += F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX, reduction="sum").item()
            count += int((target != IGNORE_INDEX).sum())
        result = evaluator(model)
        # batched and padded against each example alone: two float32 losses, each within output_tol
        assert result["n"] == len(recs)
        assert result["loss"] == pytest.approx(total / count, rel=2 * output_tol(model, positions, count))
    with pytest.raises(UsageError, match="--choices scores candidate responses, and text records have none"):
        make_evaluator("causal-lm", records, smol_tok, Fields(), 128, choices=["a"])
