"""Training data: records (files, a Hub data set, the embedded sets) -> tokenised features -> padded batches.

Formats, told apart by the fields of the first record (or named, `Fields.format` / `--format`):

- `prompt-response` (causal LM, seq2seq): a prompt and a response (or TRL's `completion`). A causal LM
  reads prompt + response + eos with the prompt masked out of the loss (-100); a seq2seq model's
  encoder reads the prompt and its decoder's labels are the response as its tokenizer encodes a
  target (`text_target=`, with the tokenizer's own special tokens: BART's `<s> ... </s>`, T5's
  `... </s>`), ending with eos. An empty response is a target of eos alone (the model learns to end
  its answer right after that prompt), counted in the features' note; any other empty field is refused.
- `messages` (causal LM): a conversation, a list of `{"role", "content"}`, rendered with the
  tokenizer's chat template; the loss is on each assistant turn and the template's own end-of-turn
  token(s) after it, found by rendering a probe conversation (`end_of_turn`).
- `text` (causal LM): plain language modelling, the loss on every token of the text + eos.
- `text-label` (classification): a text and its label.

Records longer than `max_length` tokens are truncated, skipped or refused (`too_long`), and counted.
Evaluation never cuts a reference response (a cut one would change the metric): with `truncate`, a
record whose response alone does not fit is skipped, and counted apart.
"""

from __future__ import annotations

import codecs
import csv
import logging
import random
import re
import tempfile
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch
from jinja2 import TemplateError

from lora_one.core.errors import UsageError
from lora_one.recipes import embedded_data
from lora_one.recipes.constants import (
    CAUSAL_LM,
    CLASSIFICATION,
    MESSAGES,
    PROMPT_RESPONSE,
    SEQ2SEQ,
    TEXT,
    TEXT_LABEL,
    TOO_LONG,
    Fields,
)

IGNORE_INDEX = -100
# The formats of each task, in the order detection tries them; the first is the one a record with
# none of the fields is told about.
TASK_FORMATS = {CAUSAL_LM: (PROMPT_RESPONSE, MESSAGES, TEXT), SEQ2SEQ: (PROMPT_RESPONSE,), CLASSIFICATION: (TEXT_LABEL,)}
COMPLETION = "completion"  # TRL's name for the response
ROLES = ("system", "user", "assistant")
HUB_PREFIX = "hub:"
# file suffix -> the `datasets` builder that reads it
_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet"}


DEFAULT_FIELDS = Fields()
# The flags that rename each format's fields, for the error messages.
_FIELD_FLAGS = {PROMPT_RESPONSE: "--prompt-field/--response-field", MESSAGES: "--messages-field",
                TEXT: "--text-field", TEXT_LABEL: "--text-field/--label-field"}


def read_records(source: str | Path, task: str, fields: Fields = DEFAULT_FIELDS) -> list[dict]:
    """The records of `source` (see `load_records`), checked against the format of `task` they are in
    (`fields.format`, else detected by `resolve_format`)."""
    records = load_records(source)
    check_records(records, task, fields, str(source))
    return records


def load_records(source: str | Path) -> list[dict]:
    """Records, read with `datasets`: an embedded set (`trec`, `sentiment`, `unicode`, `dialog`, optionally
    `:train`/`:val`/`:test`), a Hub data set (`hub:NAME[:CONFIG][@SPLIT]`, split `train` by default; online), or a
    file: JSON Lines (`.jsonl`/`.json`), a `.json` array of objects, CSV (`.csv`, or `.tsv`
    tab-separated; a header row names the fields; every value is read as text) or Parquet. Text
    files are UTF-8, with or without a byte-order mark (spreadsheet programs write one)."""
    spec = str(source)
    if embedded_data.is_embedded(spec):
        records = embedded_data.load(spec)
    elif spec.startswith(HUB_PREFIX) and not Path(spec).exists():
        records = _hub_records(spec)
    else:
        records = _file_records(Path(spec))
    if not records:
        raise UsageError(f"Data {spec!r} holds no records; give one with at least one record.")
    return records


def _hub_records(spec: str) -> list[dict]:
    match = re.fullmatch(r"hub:([^:@]+)(?::([^@]+))?(?:@(.+))?", spec)
    if not match:
        raise UsageError(f"--data {spec!r}: write a Hub data set as hub:NAME[:CONFIG][@SPLIT], e.g. "
                         "hub:nyu-mll/glue:sst2@validation.")
    name, config, split = match.group(1), match.group(2), match.group(3) or "train"
    from datasets import load_dataset  # imported where used: a second's import that only data reading needs

    try:
        return load_dataset(name, config, split=split).to_list()
    except Exception as e:  # noqa: BLE001 (offline, an unknown name, config or split: many types, one answer)
        raise UsageError(
            f"Cannot load the Hub data set {name!r} (config {config!r}, split {split!r}): {_first_line(e)}. Check "
            "the name, config and split, and that this machine is online (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE unset)."
        ) from None


def _file_records(path: Path) -> list[dict]:
    if not path.is_file():
        raise UsageError(f"Data file {str(path)!r} does not exist.")
    builder = _BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise UsageError(
            f"Cannot read {str(path)!r}: use a .jsonl file (one JSON object a line), a .json array of objects, "
            "a .csv (.tsv) file with a header row or a .parquet file."
        )
    if path.stat().st_size < 64 and not path.read_bytes().lstrip(codecs.BOM_UTF8).strip():
        return []  # datasets cannot tell an empty file from a broken one
    options = {}
    if builder != "parquet":
        _check_utf8(path)
    if builder == "csv":
        from datasets import Features, Value

        delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
        with path.open(encoding="utf-8-sig", newline="") as f:
            header = next(csv.reader(f, delimiter=delimiter))
        # every value as text, as written: no number parsing ("007"), no "NA" or "null" read as missing
        options = {"sep": delimiter, "keep_default_na": False, "na_filter": False,
                   "features": Features({name: Value("string") for name in header})}
    verb, kind = {"json": ("parse", "JSON Lines or a JSON array of objects"), "csv": ("parse", path.suffix[1:].upper()),
                  "parquet": ("read", "Parquet")}[builder]
    from datasets import load_dataset_builder

    # A cache of our own, gone afterwards: nothing is left behind, and processes never share one.
    with _datasets_quiet(), tempfile.TemporaryDirectory(prefix="lora_one_data_") as cache:
        try:
            reader = load_dataset_builder(builder, data_files=str(path), cache_dir=cache, **options)
            reader.download_and_prepare()
            if not reader.info.splits["train"].num_examples:  # an empty array, a header row alone
                return []
            return reader.as_dataset(split="train", in_memory=True).to_list()
        except Exception as e:  # noqa: BLE001 (pyarrow, pandas and datasets each raise their own)
            raise UsageError(f"Cannot {verb} {str(path)!r} as {kind} ({_first_line(e)}).") from None


def _first_line(error: Exception) -> str:
    """The message of the innermost cause (datasets wraps the parser's error), on one line."""
    while error.__cause__ is not None or error.__context__ is not None:
        error = error.__cause__ or error.__context__
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


@contextmanager
def _datasets_quiet():
    """No progress bars and no logged parser errors from `datasets` (the error comes as one line)."""
    import datasets

    bars, level = datasets.is_progress_bar_enabled(), datasets.logging.get_verbosity()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(logging.CRITICAL)
    try:
        yield
    finally:
        datasets.logging.set_verbosity(level)
        if bars:
            datasets.enable_progress_bars()


def _check_utf8(path: Path) -> None:
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with path.open("rb") as f:
        while True:
            chunk = f.read(1 << 20)
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as e:
                at = offset + e.start - (len(e.object) - len(chunk))  # e.object starts with bytes held back
                raise UsageError(
                    f"{str(path)!r} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {at}); re-encode it "
                    "as UTF-8 (e.g. `iconv -f WINDOWS-1252 -t UTF-8`)."
                ) from None
            if not chunk:
                return
            offset += len(chunk)


def _present(record: dict) -> set[str]:
    return {k for k, v in record.items() if v is not None and v != ""}


def resolve_format(records: list[dict], task: str, fields: Fields = DEFAULT_FIELDS) -> Fields:
    """`fields` with the format of `records` set: `fields.format` if given (it must be one of `task`'s),
    else the first of the task's formats (`TASK_FORMATS`) whose fields the first record has. A
    prompt-response record may name its response `completion` (TRL's name) while `fields.response`
    is left at its default."""
    if task not in TASK_FORMATS:
        raise UsageError(f"Unknown task {task!r}; use one of {', '.join(TASK_FORMATS)}.")
    formats = TASK_FORMATS[task]
    if fields.format is not None and fields.format not in formats:
        raise UsageError(f"--format {fields.format} is not a {task} format; use {' or '.join(formats)}.")
    first = records[0] if records and isinstance(records[0], dict) else {}
    # fields with a value, and fields named at all (an empty response is still a response)
    have, named = _present(first), {k for k, v in first.items() if v is not None}
    if fields.response == DEFAULT_FIELDS.response and fields.response not in named and COMPLETION in named:
        fields = replace(fields, response=COMPLETION)
    if fields.format is not None:
        return fields
    if task == CAUSAL_LM and {fields.text, fields.label} <= have and not {fields.prompt, fields.messages} & have:
        raise UsageError(
            f"The records have {fields.text!r} and {fields.label!r} fields, classification data, but the task is "
            f"{task}: pass --task classification (with a classification model), or --format text to train "
            "language modelling on the text alone."
        )
    found = (f for fields_of in (have, named) for f in formats if set(fields.of(f)) <= fields_of)
    return replace(fields, format=next(found, formats[0]))


def check_records(records: list, task: str, fields: Fields, source: str) -> Fields:
    """Refuse, with one line, a record without the fields of its format, with one of them empty (an
    empty response is a valid target: eos alone), or with a malformed conversation; returns the
    resolved fields."""
    fields = resolve_format(records, task, fields)
    fmt = fields.format
    needed = fields.of(fmt)
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise UsageError(f"Record {i} of {source!r} is not an object with named fields.")
        missing = [k for k in needed if rec.get(k) is None]
        if missing:
            others = [f"{f} (field{'s' if len(fields.of(f)) > 1 else ''} {', '.join(map(repr, fields.of(f)))})"
                      for f in TASK_FORMATS[task] if f != fmt]
            another = f", or give another --format: {'; '.join(others)}" if others else ""
            raise UsageError(
                f"Record {i} of {source!r} lacks field(s) {missing} needed for {task} as {fmt} (it has "
                f"{sorted(_present(rec))}). Rename the fields in the file, name them with {_FIELD_FLAGS[fmt]}"
                f"{another}."
            )
        empty = [k for k in needed if rec[k] == "" and not (fmt == PROMPT_RESPONSE and k == fields.response)]
        if empty:
            fine = " (an empty response is fine: its target is eos alone)" if fmt == PROMPT_RESPONSE else ""
            raise UsageError(f"Record {i} of {source!r} has an empty {' and '.join(map(repr, empty))} field, which "
                             f"{task} as {fmt} needs; fill it in or drop the record{fine}.")
        if fmt == MESSAGES:
            _check_conversation(rec[fields.messages], f"Record {i} of {source!r}")
    return fields


def _check_conversation(conversation, where: str) -> None:
    if not isinstance(conversation, list):
        raise UsageError(f"{where}: the messages must be a list of {{role, content}} objects, not "
                         f"{type(conversation).__name__}.")
    for j, message in enumerate(conversation):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise UsageError(f"{where}: message {j} is not an object with a text 'content'.")
        if message.get("role") not in ROLES:
            raise UsageError(f"{where}: message {j} has role {message.get('role')!r}; use {', '.join(ROLES)}.")
    roles = [m["role"] for m in conversation]
    if "assistant" not in roles:
        raise UsageError(f"{where} has no assistant turn; the loss is on assistant turns only, so give every "
                         "conversation one at least.")
    if roles[0] == "assistant":
        raise UsageError(f"{where} starts with an assistant turn; start it with a system or user turn.")


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
    """Token ids of a causal LM's response, as training sees it: no special tokens, then eos."""
    return tokenizer(response, add_special_tokens=False)["input_ids"] + [_eos_id(tokenizer)]


def target_ids(tokenizer, response: str) -> list[int]:
    """Token ids of an encoder-decoder's target: the response as its tokenizer encodes a target
    (`text_target=`, with its own special tokens: BART `<s> ... </s>`, T5 `... </s>`), then eos
    where the tokenizer does not end a target with it (a decoder-only model's tokenizer on T5)."""
    ids, eos = tokenizer(text_target=response)["input_ids"], _eos_id(tokenizer)
    return ids if ids[-1:] == [eos] else ids + [eos]


def _eos_id(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise UsageError("This tokenizer has no eos token, which ends every target sequence; use a model whose "
                         "tokenizer has one.")
    return tokenizer.eos_token_id


class Features(list):
    """Encoded examples, one per kept record, and what was done to the records: `kept` holds the
    indices of the records kept (all of them unless some were skipped), `note` one line saying how many
    were truncated or skipped, or have an empty response (None when there is nothing to say)."""

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
        self.kept, self.over, self.uncut, self.records = [], 0, 0, 0

    def admit(self, index: int, length: int, cuttable: bool = True) -> bool:
        """Whether record `index`, `length` tokens long, is used (truncated if too long); False: skip it.
        A record that is not `cuttable` (evaluation: its reference response alone does not fit) is
        skipped under `truncate` too, counted apart."""
        self.records += 1
        if length > self.max_length:
            if self.too_long == "error":
                raise UsageError(
                    f"Record {index} has {length} tokens, more than --max-length {self.max_length}; raise "
                    "--max-length (up to the model's positions), or pass --too-long truncate or skip."
                )
            if self.too_long == "truncate" and not cuttable:
                self.uncut += 1
                return False
            self.over += 1
            if self.too_long == "skip":
                return False
        self.kept.append(index)
        return True

    def result(self, examples: list[dict], how: str, empty_responses: int = 0) -> Features:
        """The features, with a note of what was done: how many records were truncated (`how`: what
        that cut) or skipped, and how many have an empty response (`empty_responses`: a target of eos alone)."""
        if (self.over or self.uncut) and not self.kept:
            raise UsageError(
                f"All {self.records} records are longer than --max-length {self.max_length} tokens"
                f"{' (evaluation never cuts a reference response)' if self.uncut else ''}; raise --max-length"
                f"{' or pass --too-long truncate' if self.too_long == 'skip' else ''}."
            )
        parts = []
        if self.over:
            done = "skipped" if self.too_long == "skip" else "truncated"
            detail = "" if self.too_long == "skip" else f" ({how})"
            parts.append(f"{done} {self.over} of {self.records} records longer than --max-length {self.max_length} "
                         f"tokens{detail}")
        if self.uncut:
            parts.append(f"skipped {self.uncut} of {self.records} records whose response alone does not fit in "
                         f"--max-length {self.max_length} tokens (evaluation never cuts a reference: a cut one would "
                         "change the metric)")
        if parts:
            parts[-1] += f"; --too-long {' or '.join(t for t in TOO_LONG if t != self.too_long)} instead"
        if empty_responses:
            parts.append(f"{empty_responses} of {self.records} records have an empty response: the target is eos "
                         "alone (the model learns to end its answer right after the prompt)")
        return Features(examples, self.kept, "; ".join(parts) or None)


def causal_lm_features(records, tokenizer, max_length: int, fields: Fields = DEFAULT_FIELDS, chat_template=False,
                       too_long: str = "truncate", room: int | None = None, cut_responses: bool = True) -> Features:
    """`input_ids` = prompt + response + eos; `labels` mask the prompt with -100.

    A record longer than `max_length` tokens is, as `too_long` says, truncated (`truncate`: the
    prompt loses its start so the response fits; a response that alone does not fit loses its end),
    skipped (`skip`) or refused (`error`). `room` reserves that many tokens after every prompt instead
    of its own response's length (the evaluator's room for its longest candidate). `cut_responses=False`
    (evaluation) skips a record whose response alone does not fit, whatever `too_long` says but error.
    """
    limit = _LengthLimit(max_length, too_long, minimum=2)
    feats, responses_cut, empty = [], 0, 0
    for i, rec in enumerate(records):
        p_ids = prompt_ids(tokenizer, str(rec[fields.prompt]), chat_template)
        r_ids = response_ids(tokenizer, str(rec[fields.response]))
        empty += rec[fields.response] == ""
        reserved = len(r_ids) if room is None else room
        if not limit.admit(i, len(p_ids) + reserved, cuttable=cut_responses or len(r_ids) < max_length):
            continue
        # Keep one prompt token at least: the first token of a sequence is never predicted.
        keep = min(len(p_ids), max(1, max_length - reserved))
        p_ids = p_ids[len(p_ids) - keep :]
        responses_cut += len(r_ids) > max_length - len(p_ids)
        r_ids = r_ids[: max_length - len(p_ids)]
        feats.append({"input_ids": p_ids + r_ids, "labels": [IGNORE_INDEX] * len(p_ids) + r_ids})
    cut = f"; the response's end too in {responses_cut}" if responses_cut else ""
    return limit.result(feats, f"cut the prompt's start{cut}", empty)


def label_mapping(records, fields: Fields = DEFAULT_FIELDS) -> dict[str, int]:
    return {lab: i for i, lab in enumerate(sorted({str(r[fields.label]) for r in records}))}


def classification_features(records, tokenizer, max_length: int, label2id: dict, fields: Fields = DEFAULT_FIELDS,
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


def text_features(records, tokenizer, max_length: int, fields: Fields = DEFAULT_FIELDS, too_long: str = "truncate") -> Features:
    """Plain language modelling: `input_ids` = the text (with the tokenizer's special tokens) + eos,
    `labels` the same tokens, so every token is predicted. A longer text loses its end."""
    limit = _LengthLimit(max_length, too_long, minimum=2)
    eos, feats = _eos_id(tokenizer), []
    for i, rec in enumerate(records):
        ids = tokenizer(str(rec[fields.text]))["input_ids"] + [eos]
        if limit.admit(i, len(ids)):
            feats.append({"input_ids": ids[:max_length], "labels": ids[:max_length]})
    return limit.result(feats, "cut the text's end")


def seq2seq_features(records, tokenizer, max_length: int, fields: Fields = DEFAULT_FIELDS,
                     too_long: str = "truncate", cut_responses: bool = True) -> Features:
    """Encoder-decoder examples: `input_ids` the prompt with the tokenizer's special tokens (T5: then
    `</s>`), `labels` the response as the tokenizer encodes a target (`target_ids`: BART `<s> ... </s>`),
    which the model itself shifts right behind its decoder start token. `max_length` bounds each of the
    two: a longer prompt loses its end (its start holds e.g. T5's task prefix), keeping the tokenizer's
    end tokens; a longer response loses its end (`cut_responses=False`, evaluation: its record is skipped)."""
    limit = _LengthLimit(max_length, too_long, minimum=1)
    feats, prompts_cut, responses_cut, empty = [], 0, 0, 0
    for i, rec in enumerate(records):
        prompt = str(rec[fields.prompt])
        p_ids = tokenizer(prompt, truncation=True, max_length=max_length + 1)["input_ids"]  # one over tells
        r_ids = target_ids(tokenizer, str(rec[fields.response]))
        empty += rec[fields.response] == ""
        if not limit.admit(i, max(len(p_ids), len(r_ids)), cuttable=cut_responses or len(r_ids) <= max_length):
            continue
        if len(p_ids) > max_length:  # again, so the tokenizer keeps its end-of-text tokens
            p_ids = tokenizer(prompt, truncation=True, max_length=max_length)["input_ids"]
            prompts_cut += 1
        responses_cut += len(r_ids) > max_length
        feats.append({"input_ids": p_ids, "labels": r_ids[:max_length]})
    cut = " and ".join(f"{n} {what}(s)" for n, what in ((prompts_cut, "prompt"), (responses_cut, "response")) if n)
    return limit.result(feats, f"cut the end of {cut}", empty)


def end_of_turn(tokenizer) -> str:
    """The text the chat template closes an assistant turn with (SmolLM2: `<|im_end|>`; a template
    that ends turns with the eos token: that token), from rendering a probe conversation: what the
    template writes after the assistant's content, whitespace around it left out. (Whitespace between
    the generation prompt and the content, as in `Bot:` then ` text`, belongs to the turn.)"""
    if not tokenizer.chat_template:
        raise UsageError("The messages format renders conversations with the tokenizer's chat template, and this "
                         "model's tokenizer has none; use a chat model, or give prompt/response or text records.")
    content = "lora-one-probe"
    probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": content}]
    asked = _render(tokenizer, probe[:1], "A probe conversation", generation=True)
    turn = _render(tokenizer, probe, "A probe conversation").removeprefix(asked)
    if not turn.lstrip().startswith(content):
        raise UsageError("The chat template does not write an assistant turn right after the generation prompt it "
                         f"opens it with (it wrote {turn[:60]!r}), so assistant tokens cannot be located.")
    closing = turn[turn.index(content) + len(content) :].strip()
    if not closing:
        raise UsageError("The chat template ends an assistant turn with nothing but whitespace, so a model trained "
                         "on it would not learn to stop; use a tokenizer whose template ends turns with a token.")
    return closing


def _render(tokenizer, conversation: list[dict], where: str, generation: bool = False) -> str:
    try:
        return tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=generation)
    except TemplateError as e:
        raise UsageError(f"{where}: the chat template refused it ({e}).") from None


def _assistant_spans(tokenizer, conversation: list[dict], closing: str, where: str) -> tuple[str, list[tuple]]:
    """The rendered conversation and the character spans of its assistant turns, each from the end of
    the generation prompt before it through its closing text. A turn's start is where the rendering of
    the turns before it with the generation prompt ends; that rendering, and the one ending with the
    turn, must be prefixes of the whole (the template appends turns rather than rewriting earlier ones)."""
    text = _render(tokenizer, conversation, where)
    spans = []
    for k, message in enumerate(conversation):
        if message["role"] != "assistant":
            continue
        asked = _render(tokenizer, conversation[:k], where, generation=True)
        upto = _render(tokenizer, conversation[: k + 1], where)
        end = upto.rfind(closing, len(asked))
        if not (upto.startswith(asked) and text.startswith(upto)) or end < 0:
            raise UsageError(
                f"{where}: the chat template renders message {k} (assistant) differently once other turns follow "
                f"or without its closing {closing!r}, so its tokens cannot be located; give this conversation as "
                "prompt/response records, or use a template that appends turns."
            )
        spans.append((len(asked), end + len(closing)))
    return text, spans


def messages_features(records, tokenizer, max_length: int, fields: Fields = DEFAULT_FIELDS,
                      too_long: str = "truncate") -> Features:
    """Conversations rendered with the chat template, tokenised as `apply_chat_template` does; `labels`
    keep the tokens of each assistant turn (its content and the template's closing token(s), e.g.
    `<|im_end|>`) and mask the rest. What follows the last assistant turn is dropped: it adds no
    loss term and, the model being causal, changes no prediction. A longer conversation loses its start."""
    if not tokenizer.is_fast:
        raise UsageError("The messages format needs a fast tokenizer (it maps tokens to characters); load one "
                         "with use_fast=True.")
    closing = end_of_turn(tokenizer)
    limit = _LengthLimit(max_length, too_long, minimum=2)
    feats = []
    for i, rec in enumerate(records):
        where = f"Record {i}"
        # datasets fills the keys that other messages have with None; templates test for their presence
        conversation = [{k: v for k, v in m.items() if v is not None} for m in rec[fields.messages]]
        _check_conversation(conversation, where)
        text, spans = _assistant_spans(tokenizer, conversation, closing, where)
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, labels = enc["input_ids"], []
        for token, (a, b) in zip(ids, enc["offset_mapping"]):
            labels.append(token if any(a < end and b > start for start, end in spans) else IGNORE_INDEX)
        if not all(any(b == end for (_, b), lab in zip(enc["offset_mapping"], labels) if lab != IGNORE_INDEX)
                   for _, end in spans):
            raise UsageError(f"{where}: the tokenizer's offsets do not end a token where an assistant turn ends "
                             f"(after {closing!r}), so the turn cannot be masked exactly.")
        last = max(t for t, lab in enumerate(labels) if lab != IGNORE_INDEX) + 1
        if limit.admit(i, last):
            feats.append({"input_ids": ids[max(0, last - max_length) : last],
                          "labels": labels[max(0, last - max_length) : last]})
    return limit.result(feats, "cut the conversation's start")


def prepare(records, tokenizer, task: str, fields: Fields = DEFAULT_FIELDS, max_length: int = 256,
            too_long: str = "truncate", chat_template: bool = False, label2id: dict | None = None,
            cut_responses: bool = True) -> Features:
    """The training features of `records` for `task`, in their format (`fields.format`, else detected):
    one call for every format, so that the command line and a Trainer callback building its own batches
    apply the same rules. `label2id` (classification) defaults to `label_mapping(records)`;
    `chat_template` wraps causal-LM prompts (conversations always use the template); `cut_responses=False`
    (evaluation) skips a prompt/response record whose response alone does not fit instead of cutting it."""
    fields = check_records(records, task, fields, "the data")
    fmt = fields.format
    if chat_template and (task == SEQ2SEQ or fmt == TEXT):
        raise UsageError(f"--chat-template wraps causal-LM prompts, and {task} {fmt} records have none; drop it.")
    if fmt == TEXT_LABEL:
        return classification_features(records, tokenizer, max_length, label2id or label_mapping(records, fields),
                                       fields, too_long)
    if fmt == MESSAGES:
        return messages_features(records, tokenizer, max_length, fields, too_long)
    if fmt == TEXT:
        return text_features(records, tokenizer, max_length, fields, too_long)
    if task == SEQ2SEQ:
        return seq2seq_features(records, tokenizer, max_length, fields, too_long, cut_responses)
    return causal_lm_features(records, tokenizer, max_length, fields, chat_template, too_long,
                              cut_responses=cut_responses)


def collate(features: list[dict], pad_id: int, decoder_start_id: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad `input_ids` with `pad_id` and mask the padding; right-pad token `labels` with -100 to
    their own width (a seq2seq decoder's targets are as long as they are, not as the encoder's input).

    With `decoder_start_id` (an encoder-decoder's `config.decoder_start_token_id`), also the
    `decoder_input_ids` the model would make from the labels: them shifted right behind the start
    token, -100 as `pad_id`. A loss computed outside the model (a Trainer's `compute_loss_func`, for
    which the Trainer keeps the labels from the model) then sees the same decoder."""
    width = max(len(f["input_ids"]) for f in features)
    ids = torch.full((len(features), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(features), width), dtype=torch.long)
    for i, f in enumerate(features):
        ids[i, : len(f["input_ids"])] = torch.tensor(f["input_ids"])
        mask[i, : len(f["input_ids"])] = 1
    if not isinstance(features[0]["labels"], list):
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([f["labels"] for f in features])}
    labels = torch.full((len(features), max(len(f["labels"]) for f in features)), IGNORE_INDEX)
    for i, f in enumerate(features):
        labels[i, : len(f["labels"])] = torch.tensor(f["labels"])
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if decoder_start_id is not None:
        shifted = torch.cat([torch.full((len(features), 1), decoder_start_id), labels[:, :-1]], 1)
        batch["decoder_input_ids"] = shifted.masked_fill(shifted == IGNORE_INDEX, pad_id)
    return batch


def init_sample_indices(n_records: int, n: int, seed: int) -> list[int]:
    """Which training records the init uses: `n` of `n_records`, drawn without replacement with `seed`."""
    if n > n_records:
        raise UsageError(f"--init-samples {n} exceeds the {n_records} training records; lower it.")
    return random.Random(seed).sample(range(n_records), n)


def init_batches(features: list[dict], n: int, batch_size: int, seed: int, pad_id: int,
                 search_batch_size: int | None = None, part: tuple[int, int] = (0, 1)) -> list[dict]:
    """The batches a recipe hands `get_lora_one_model` (with `init_samples=n`): `n` examples drawn without
    replacement with `seed`, in micro-batches of `batch_size`; with `search_batch_size` (a gamma search),
    then the `n` examples the search judges the init step on, drawn with `seed + 1` from those that are not
    init samples (the step fitted to its own samples looks better there than it is), in batches of
    `search_batch_size` (forward passes only). `part = (index, count)` takes one process's share of each,
    its examples `index::count`: exactly the share that `get_lora_one_model` reads as this process's init
    samples, and then as its search samples, so the union over the processes is the same for any count."""
    if n < 1 or batch_size < 1:
        raise UsageError(f"--init-samples and --init-batch-size must be >= 1 (got {n}, {batch_size}).")
    init = init_sample_indices(len(features), n, seed)
    index, count = part
    batches = _batched([features[i] for i in init][index::count], batch_size, pad_id)
    if search_batch_size is None:
        return batches
    chosen = set(init)
    rest = [i for i in range(len(features)) if i not in chosen]
    if n > len(rest):
        raise UsageError(f"a --gamma search needs {n} training records besides the {n} init samples, and there are "
                         f"{len(rest)}; lower --init-samples or give --gamma a number.")
    held_out = [features[i] for i in random.Random(seed + 1).sample(rest, n)][index::count]
    return batches + _batched(held_out, search_batch_size, pad_id)


def _batched(features: list[dict], batch_size: int, pad_id: int) -> list[dict]:
    return [collate(features[i : i + batch_size], pad_id) for i in range(0, len(features), batch_size)]
