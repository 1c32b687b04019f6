"""Training data: JSON Lines, JSON or CSV records -> tokenised features -> padded batches.

Causal LM records have a prompt and a response (the prompt tokens are masked out of the loss with
-100); classification records have a text and a label. Records longer than `max_length` tokens are
truncated, skipped or refused (`too_long`), and counted.
"""

from __future__ import annotations

import csv
import io
import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from lora_one import embedded_data
from lora_one.errors import UsageError
from lora_one.models import CAUSAL_LM

IGNORE_INDEX = -100
# What to do with a record longer than --max-length tokens.
TOO_LONG = ("truncate", "skip", "error")


@dataclass
class Fields:
    prompt: str = "prompt"
    response: str = "response"
    text: str = "text"
    label: str = "label"

    def required(self, task: str) -> tuple[str, str]:
        return (self.prompt, self.response) if task == CAUSAL_LM else (self.text, self.label)


def read_records(path: str | Path, task: str, fields: Fields = Fields()) -> list[dict]:
    """Read JSON Lines (`.jsonl`/`.json`, one object a line), a `.json` file holding an array of objects,
    CSV (`.csv`, or `.tsv` tab-separated; a header row names the fields) or an embedded data set (`trec`,
    `sentiment`, optionally `:train`/`:val`/`:test`), and check its fields. Files are UTF-8, with or
    without a byte-order mark (spreadsheet programs write one)."""
    if embedded_data.is_embedded(str(path)):
        return _check_fields(embedded_data.load(str(path)), str(path), task, fields)
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"Data file {str(path)!r} does not exist.")
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".json", ".csv", ".tsv"):
        raise UsageError(
            f"Cannot read {str(path)!r}: use a .jsonl file (one JSON object a line), a .json array of objects "
            "or a .csv file with a header row."
        )
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: drop a leading byte-order mark
    except UnicodeDecodeError as e:
        raise UsageError(
            f"{str(path)!r} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); re-encode it "
            "as UTF-8 (e.g. `iconv -f WINDOWS-1252 -t UTF-8`)."
        ) from None
    if suffix in (".csv", ".tsv"):
        try:
            records = list(csv.DictReader(io.StringIO(text, newline=""), delimiter="\t" if suffix == ".tsv" else ","))
        except csv.Error as e:
            raise UsageError(f"Cannot parse {str(path)!r} as {suffix[1:].upper()}: {e}.") from None
    else:
        records = _parse_json(text, str(path))
    return _check_fields(records, str(path), task, fields)


def _parse_json(text: str, path: str) -> list:
    """The records of a JSON array, or of JSON Lines (blank lines skipped)."""
    if text.lstrip().startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise UsageError(f"Cannot parse {path!r} as a JSON array: {e}.") from None
    records = []
    for n, line in enumerate(text.split("\n"), 1):  # not splitlines(): JSON strings may hold U+2028
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise UsageError(
                    f"Cannot parse line {n} of {path!r} as JSON ({e}); give JSON Lines (one object a line) "
                    "or a JSON array of objects."
                ) from None
    return records


def _check_fields(records: list, path: str, task: str, fields: Fields) -> list[dict]:
    if not records:
        raise UsageError(f"Data file {str(path)!r} holds no records; give one with at least one record.")
    needed = fields.required(task)
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise UsageError(f"Record {i} of {str(path)!r} is not an object with named fields.")
        missing = [k for k in needed if rec.get(k) in (None, "")]
        if missing:
            raise UsageError(
                f"Record {i} of {str(path)!r} lacks field(s) {missing} needed for {task} "
                f"(it has {sorted(rec)}). Rename the fields in the file or name them with "
                "--prompt-field/--response-field (causal LM) or --text-field/--label-field (classification)."
            )
    return records


def prompt_ids(tokenizer, prompt: str, chat_template: bool = False) -> list[int]:
    """Token ids of a prompt, as training sees it (optionally inside the chat template)."""
    if chat_template:
        if not tokenizer.chat_template:
            raise UsageError("--chat-template: this model's tokenizer has no chat template; drop the flag.")
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
    return tokenizer(prompt, add_special_tokens=not chat_template)["input_ids"]


def response_ids(tokenizer, response: str) -> list[int]:
    """Token ids of a response, as training sees it: no special tokens, then eos."""
    return tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


class Features(list):
    """Encoded examples, one per kept record, and what the length limit did: `kept` holds the indices
    of the records kept (all of them unless `too_long="skip"`), `note` one line saying how many were
    truncated or skipped (None when every record fit)."""

    def __init__(self, examples: list[dict], kept: list[int], note: str | None):
        super().__init__(examples)
        self.kept, self.note = kept, note


class _LengthLimit:
    """Applies a `too_long` policy to records, counting what it did."""

    def __init__(self, max_length: int, too_long: str, minimum: int):
        if too_long not in TOO_LONG:
            raise UsageError(f"too_long={too_long!r}: choose one of {', '.join(TOO_LONG)}.")
        if max_length < minimum:
            raise UsageError(f"--max-length must be >= {minimum}, got {max_length}.")
        self.max_length, self.too_long = max_length, too_long
        self.kept, self.over, self.records = [], 0, 0

    def admit(self, index: int, length: int) -> bool:
        """Whether record `index`, `length` tokens long, is used (truncated if too long); False: skip it."""
        self.records += 1
        if length > self.max_length:
            if self.too_long == "error":
                raise UsageError(
                    f"Record {index} has {length} tokens, more than --max-length {self.max_length}; raise "
                    "--max-length (up to the model's positions), or pass --too-long truncate or skip."
                )
            self.over += 1
            if self.too_long == "skip":
                return False
        self.kept.append(index)
        return True

    def result(self, examples: list[dict], how: str) -> Features:
        if self.over and not self.kept:
            raise UsageError(
                f"All {self.records} records are longer than --max-length {self.max_length} tokens; raise "
                "--max-length or pass --too-long truncate."
            )
        note = None
        if self.over:
            done = "skipped" if self.too_long == "skip" else "truncated"
            detail = "" if self.too_long == "skip" else f" ({how})"
            other = " or ".join(t for t in TOO_LONG if t != self.too_long)
            note = (f"{done} {self.over} of {self.records} records longer than --max-length {self.max_length} "
                    f"tokens{detail}; --too-long {other} instead")
        return Features(examples, self.kept, note)


def causal_lm_features(records, tokenizer, max_length: int, fields: Fields = Fields(), chat_template=False,
                       too_long: str = "truncate", room: int | None = None) -> Features:
    """`input_ids` = prompt + response + eos; `labels` mask the prompt with -100.

    A record longer than `max_length` tokens is, as `too_long` says, truncated (`truncate`: the
    prompt loses its start so the response fits; a response that alone does not fit loses its end),
    skipped (`skip`) or refused (`error`). `room` reserves that many tokens after every prompt instead
    of its own response's length (the evaluator's room for its longest candidate).
    """
    limit = _LengthLimit(max_length, too_long, minimum=2)
    feats, responses_cut = [], 0
    for i, rec in enumerate(records):
        p_ids = prompt_ids(tokenizer, str(rec[fields.prompt]), chat_template)
        r_ids = response_ids(tokenizer, str(rec[fields.response]))
        reserved = len(r_ids) if room is None else room
        if not limit.admit(i, len(p_ids) + reserved):
            continue
        # Keep one prompt token at least: the first token of a sequence is never predicted.
        keep = min(len(p_ids), max(1, max_length - reserved))
        p_ids = p_ids[len(p_ids) - keep :]
        responses_cut += len(r_ids) > max_length - len(p_ids)
        r_ids = r_ids[: max_length - len(p_ids)]
        feats.append({"input_ids": p_ids + r_ids, "labels": [IGNORE_INDEX] * len(p_ids) + r_ids})
    cut = f"; the response's end too in {responses_cut}" if responses_cut else ""
    return limit.result(feats, f"cut the prompt's start{cut}")


def label_mapping(records, fields: Fields = Fields()) -> dict[str, int]:
    return {lab: i for i, lab in enumerate(sorted({str(r[fields.label]) for r in records}))}


def classification_features(records, tokenizer, max_length: int, label2id: dict, fields: Fields = Fields(),
                            too_long: str = "truncate") -> Features:
    """`input_ids` of the text (with the tokenizer's special tokens), `labels` the class index. A text
    longer than `max_length` tokens loses its end (`too_long="truncate"`), is skipped or refused."""
    limit = _LengthLimit(max_length, too_long, minimum=1)
    feats = []
    for i, rec in enumerate(records):
        label = str(rec[fields.label])
        if label not in label2id:
            raise UsageError(
                f"Label {label!r} (record {i}) never occurs in the training data (known: {sorted(label2id)}); "
                "evaluate on records with known labels, or add some to the training data."
            )
        # One token over the limit is enough to tell a text that does not fit.
        ids = tokenizer(str(rec[fields.text]), truncation=True, max_length=max_length + 1)["input_ids"]
        if not limit.admit(i, len(ids)):
            continue
        if len(ids) > max_length:  # again, so the tokenizer keeps its end-of-text tokens
            ids = tokenizer(str(rec[fields.text]), truncation=True, max_length=max_length)["input_ids"]
        feats.append({"input_ids": ids, "labels": label2id[label]})
    return limit.result(feats, "cut the text's end")


def loss_terms(feature: dict) -> int:
    """How many terms the model's mean loss averages over for this example: its predicted tokens (a
    causal LM predicts token t + 1 from token t, so the first label never counts), or one class label."""
    labels = feature["labels"]
    return sum(t != IGNORE_INDEX for t in labels[1:]) if isinstance(labels, list) else 1


def collate(features: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad `input_ids` with `pad_id` and token `labels` with -100; mask the padding."""
    width = max(len(f["input_ids"]) for f in features)
    ids = torch.full((len(features), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(features), width), dtype=torch.long)
    token_labels = isinstance(features[0]["labels"], list)
    labels = torch.full((len(features), width), IGNORE_INDEX) if token_labels else torch.empty(len(features), dtype=torch.long)
    for i, f in enumerate(features):
        n = len(f["input_ids"])
        ids[i, :n] = torch.tensor(f["input_ids"])
        mask[i, :n] = 1
        if token_labels:
            labels[i, :n] = torch.tensor(f["labels"])
        else:
            labels[i] = f["labels"]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def init_sample_indices(n_records: int, n: int, seed: int) -> list[int]:
    """Which training records the init uses: `n` of `n_records`, drawn without replacement with `seed`."""
    if n > n_records:
        raise UsageError(f"--init-samples {n} exceeds the {n_records} training records; lower it.")
    return random.Random(seed).sample(range(n_records), n)


def init_batches(features: list[dict], n: int, batch_size: int, seed: int, pad_id: int) -> list[dict]:
    """`n` examples drawn without replacement with `seed`, in micro-batches of `batch_size`."""
    if n < 1 or batch_size < 1:
        raise UsageError(f"--init-samples and --init-batch-size must be >= 1 (got {n}, {batch_size}).")
    picked = [features[i] for i in init_sample_indices(len(features), n, seed)]
    return [collate(picked[i : i + batch_size], pad_id) for i in range(0, n, batch_size)]
