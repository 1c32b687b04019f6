"""Training data: JSONL or CSV records -> tokenised features -> padded batches.

Causal LM records have a prompt and a response (the prompt tokens are masked out of the loss with
-100); classification records have a text and a label.
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from lora_one import embedded_data
from lora_one.errors import UsageError
from lora_one.models import CAUSAL_LM

IGNORE_INDEX = -100


@dataclass
class Fields:
    prompt: str = "prompt"
    response: str = "response"
    text: str = "text"
    label: str = "label"

    def required(self, task: str) -> tuple[str, str]:
        return (self.prompt, self.response) if task == CAUSAL_LM else (self.text, self.label)


def read_records(path: str | Path, task: str, fields: Fields = Fields()) -> list[dict]:
    """Read a JSONL (`.jsonl`/`.json`) or CSV (`.csv`/`.tsv`) file, or an embedded data set
    (`trec`, `sentiment`, optionally `:train`/`:val`/`:test`), and check its fields."""
    if embedded_data.is_embedded(str(path)):
        return _check_fields(embedded_data.load(str(path)), str(path), task, fields)
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"Data file {str(path)!r} does not exist.")
    suffix = path.suffix.lower()
    try:
        if suffix in (".jsonl", ".json"):
            with path.open(encoding="utf-8") as f:
                records = [json.loads(line) for line in f if line.strip()]
        elif suffix in (".csv", ".tsv"):
            with path.open(encoding="utf-8", newline="") as f:
                records = list(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ","))
        else:
            raise UsageError(
                f"Cannot read {str(path)!r}: use a .jsonl file (one JSON object a line) or a .csv file "
                "with a header row."
            )
    except (json.JSONDecodeError, UnicodeDecodeError, csv.Error) as e:
        raise UsageError(f"Cannot parse {str(path)!r} as {suffix[1:].upper()}: {e}") from e
    return _check_fields(records, str(path), task, fields)


def _check_fields(records: list, path: str, task: str, fields: Fields) -> list[dict]:
    if not records:
        raise UsageError(f"Data file {str(path)!r} holds no records.")
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
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
    return tokenizer(prompt, add_special_tokens=not chat_template)["input_ids"]


def response_ids(tokenizer, response: str) -> list[int]:
    """Token ids of a response, as training sees it: no special tokens, then eos."""
    return tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def causal_lm_features(records, tokenizer, max_length: int, fields: Fields = Fields(), chat_template=False):
    """`input_ids` = prompt + response + eos; `labels` mask the prompt with -100."""
    feats = []
    for i, rec in enumerate(records):
        p_ids = prompt_ids(tokenizer, str(rec[fields.prompt]), chat_template)
        r_ids = response_ids(tokenizer, str(rec[fields.response]))
        ids = (p_ids + r_ids)[:max_length]
        labels = ([IGNORE_INDEX] * len(p_ids) + r_ids)[:max_length]
        if all(t == IGNORE_INDEX for t in labels):
            raise UsageError(
                f"Record {i}: the prompt fills all {max_length} tokens, leaving no response to learn; "
                "raise --max-length or shorten the prompt."
            )
        feats.append({"input_ids": ids, "labels": labels})
    return feats


def label_mapping(records, fields: Fields = Fields()) -> dict[str, int]:
    return {lab: i for i, lab in enumerate(sorted({str(r[fields.label]) for r in records}))}


def classification_features(records, tokenizer, max_length: int, label2id: dict, fields: Fields = Fields()):
    feats = []
    for rec in records:
        label = str(rec[fields.label])
        if label not in label2id:
            raise UsageError(
                f"Label {label!r} never occurs in the training data (known: {sorted(label2id)})."
            )
        ids = tokenizer(str(rec[fields.text]), truncation=True, max_length=max_length)["input_ids"]
        feats.append({"input_ids": ids, "labels": label2id[label]})
    return feats


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
