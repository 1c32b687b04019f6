"""Held-out evaluation: loss and the task metric, batched.

- Classification: cross-entropy and accuracy of the argmax class.
- Prompt/response records (causal LM, seq2seq) with a closed label set (`--choices`, the run's
  recorded choices, or responses that take few distinct values): each candidate response (with its
  eos, exactly as training saw it) is scored by its summed log-likelihood after the prompt (causal
  LM) or by the decoder given the encoded prompt (seq2seq); the prediction is the best candidate. The
  loss is the mean token cross-entropy of the gold responses, as in training.
- Prompt/response records otherwise: the same loss, and exact match of greedy generations
  (whitespace-stripped).
- Text and conversation records (causal LM): the mean token cross-entropy of what training predicts.

Causal-LM candidate scoring shares work: the prompts' common token prefix (e.g. an instruction) runs
once per batch, each prompt once, and each candidate only over its own tokens, through the KV cache;
the result equals scoring every (prompt, candidate) pair with a full forward pass (tested). Seq2seq
scoring encodes each prompt once and decodes every candidate against it.
"""

from __future__ import annotations

import inspect
import random
from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers.modeling_outputs import BaseModelOutput

from lora_one.core.errors import UsageError
from lora_one.recipes.data import (
    DEFAULT_FIELDS,
    IGNORE_INDEX,
    PROMPT_RESPONSE,
    Fields,
    causal_lm_features,
    collate,
    prepare,
    resolve_format,
    response_ids,
    target_ids,
)
from lora_one.recipes.models import CAUSAL_LM, CLASSIFICATION, SEQ2SEQ

MAX_CHOICES = 32


def infer_choices(responses: Sequence[str]) -> list[str] | None:
    """The closed label set of a prompt/response data set, or None when the responses look open-ended:
    at most `MAX_CHOICES` distinct values, each seen on average at least twice."""
    distinct = sorted(set(responses))
    if len(distinct) <= MAX_CHOICES and 2 * len(distinct) <= len(responses):
        return distinct
    return None


def parse_choices(text: str) -> list[str]:
    """The `--choices` flag: a comma-separated label set, empty items dropped."""
    return [c for c in text.split(",") if c.strip()]


def choices_of(records, task: str, fields: Fields = DEFAULT_FIELDS, given: str | None = None,
               recorded: list[str] | None = None) -> list[str] | None:
    """The closed label set a run scores candidates from: `given` (the `--choices` flag), else the one a
    run `recorded`, else inferred from the responses of prompt/response `records`; None for other
    records (classification's labels are its classes; text and conversations are open-ended)."""
    if given and task == CLASSIFICATION:
        raise UsageError("--choices is for causal-lm and seq2seq runs; a classifier's labels come from the data.")
    if given:
        return parse_choices(given)
    if recorded:
        return list(recorded)
    fields = resolve_format(records, task, fields)
    if fields.format != PROMPT_RESPONSE:
        return None
    return infer_choices([str(r[fields.response]) for r in records])


def match_choices(choices: Sequence[str], responses: Sequence[str]) -> list[str]:
    """Candidates in the form the data writes them (`location` given, ` location` in the data);
    every response must be one of them."""
    by_stripped = {r.strip(): r for r in responses}
    cands = [by_stripped.get(c.strip(), c) for c in choices]
    known = {c.strip() for c in cands}
    unseen = sorted({r for r in responses if r.strip() not in known})
    if unseen:
        raise UsageError(
            f"{len(unseen)} response(s) of the evaluation data are not among the label set "
            f"{[c.strip() for c in cands]} (e.g. {unseen[0]!r}); labels in the eval set must occur in training."
        )
    return cands


def _common_prefix(seqs: Sequence[Sequence[int]]) -> list[int]:
    first = seqs[0]
    n = min(len(s) for s in seqs) - 1  # leave every prompt at least one token of its own
    for s in seqs[1:]:
        k = 0
        while k < n and s[k] == first[k]:
            k += 1
        n = k
    return list(first[: max(n, 0)])


def _cache_kwarg(model) -> str:
    """transformers renamed `past_key_values` to `cache` during 5.x; use whichever the model takes."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _cache_of(output):
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def _pad(seqs: Sequence[Sequence[int]], device, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(1, max(len(s) for s in seqs))
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        where = slice(width - len(s), width) if left else slice(0, len(s))
        ids[i, where] = torch.tensor(s, dtype=torch.long)
        mask[i, where] = 1
    return ids.to(device), mask.to(device)


def _scoring_batches(prompts: Sequence[Sequence[int]], batch_size: int, progress: bool):
    """The prompts' indices in batches of similar lengths (less padding per batch), with a progress bar."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    for start in tqdm(range(0, len(prompts), batch_size), desc="scoring", unit="batch", disable=not progress,
                      leave=False):
        yield order[start : start + batch_size]


@torch.no_grad()
def score_candidates(
    model, prompts: Sequence[Sequence[int]], candidates: Sequence[Sequence[int]], batch_size: int = 16,
    progress: bool = False,
) -> torch.Tensor:
    """`(n_prompts, n_candidates)` summed log-probabilities of each candidate's tokens after each prompt.

    Per batch: the common prefix once (then shared through the KV cache), the prompts' own tokens
    left-padded after it (logits of the last position only), then every candidate's tokens but the
    last, after every prompt. Padding holes are masked and position ids count real tokens only.
    """
    if not prompts or not candidates or any(len(c) == 0 for c in candidates) or any(len(p) == 0 for p in prompts):
        raise UsageError("score_candidates needs non-empty prompts and candidates.")
    device = next(model.parameters()).device
    n_cand = len(candidates)
    prefix = _common_prefix(prompts)
    p = len(prefix)
    first = torch.tensor([c[0] for c in candidates], device=device)
    cont_ids, cont_mask = _pad([c[:-1] for c in candidates], device)  # tokens fed after the prompt
    targets, _ = _pad([c[1:] for c in candidates], device)  # what they predict
    cont_len = max(len(c) for c in candidates) - 1
    kw = _cache_kwarg(model)
    scores = torch.empty(len(prompts), n_cand)
    for rows in _scoring_batches(prompts, batch_size, progress):
        b = len(rows)
        cache = None
        if p:
            cache = _cache_of(model(input_ids=torch.tensor([prefix], device=device), use_cache=True))
            cache.batch_repeat_interleave(b)
        ids, mask = _pad([prompts[i][p:] for i in rows], device, left=True)
        lengths = mask.sum(1)
        attn = torch.cat([torch.ones(b, p, dtype=torch.long, device=device), mask], 1)
        pos = (p + mask.cumsum(1) - 1).clamp(min=p)
        out = model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True, logits_to_keep=1,
                    **{kw: cache})
        score = out.logits[:, -1].float().log_softmax(-1)[:, first]  # (b, n_cand)
        if cont_len > 0:
            cache = _cache_of(out)
            cache.batch_repeat_interleave(n_cand)
            cmask = cont_mask.repeat(b, 1)
            attn2 = torch.cat([attn.repeat_interleave(n_cand, 0), cmask], 1)
            pos2 = (p + lengths).repeat_interleave(n_cand)[:, None] + torch.arange(cont_len, device=device)
            logits = model(input_ids=cont_ids.repeat(b, 1), attention_mask=attn2, position_ids=pos2,
                           **{kw: cache}).logits
            logp = logits.float().log_softmax(-1).gather(-1, targets.repeat(b, 1)[..., None])[..., 0]
            score = score + (logp * cmask).sum(1).view(b, n_cand)
        scores[rows] = score.cpu()
        del out, cache
    return scores


@torch.no_grad()
def score_seq2seq_candidates(
    model, prompts: Sequence[Sequence[int]], candidates: Sequence[Sequence[int]], batch_size: int = 16,
    progress: bool = False,
) -> torch.Tensor:
    """`(n_prompts, n_candidates)` summed decoder log-probabilities of each candidate's tokens (the
    decoder's labels, eos included) given each prompt: per batch, the encoder runs once over its
    prompts and the decoder once over every (prompt, candidate) pair, starting from its own start token."""
    if not prompts or not candidates or any(len(c) == 0 for c in candidates) or any(len(p) == 0 for p in prompts):
        raise UsageError("score_seq2seq_candidates needs non-empty prompts and candidates.")
    device = next(model.parameters()).device
    n_cand = len(candidates)
    labels, label_mask = _pad(candidates, device)
    labels = labels.masked_fill(label_mask == 0, IGNORE_INDEX)
    scores = torch.empty(len(prompts), n_cand)
    for rows in _scoring_batches(prompts, batch_size, progress):
        b = len(rows)
        ids, mask = _pad([prompts[i] for i in rows], device)
        hidden = model.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state
        pairs = labels.repeat(b, 1)  # row r * n_cand + c: prompt r, candidate c
        logits = model(encoder_outputs=BaseModelOutput(last_hidden_state=hidden.repeat_interleave(n_cand, 0)),
                       attention_mask=mask.repeat_interleave(n_cand, 0), labels=pairs).logits
        logp = logits.float().log_softmax(-1).gather(-1, pairs.clamp(min=0)[..., None])[..., 0]
        scores[rows] = (logp * label_mask.repeat(b, 1)).sum(1).view(b, n_cand).cpu()
    return scores


def _token_nll(model, features: list[dict], pad_id: int, batch_size: int, progress: bool = False) -> tuple[float, int]:
    """Summed token cross-entropy of the `labels` the model predicts (masked tokens left out: a causal
    LM predicts label t + 1 at position t, an encoder-decoder its labels as they are) and their number."""
    device = next(model.parameters()).device
    shifted = not model.config.is_encoder_decoder
    total, count = 0.0, 0
    starts = range(0, len(features), batch_size)
    for start in tqdm(starts, desc="loss", unit="batch", disable=not progress, leave=False):
        batch = {k: v.to(device) for k, v in collate(features[start : start + batch_size], pad_id).items()}
        labels = batch["labels"]  # an encoder-decoder makes its decoder inputs from them
        logits = model(**batch).logits.float()
        if shifted:
            logits, labels = logits[:, :-1], labels[:, 1:]
        total += F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum").item()
        count += int((labels != IGNORE_INDEX).sum())
    return total, count


@torch.no_grad()
def greedy_generate(model, tokenizer, prompts: Sequence[Sequence[int]], max_new_tokens: int, batch_size: int,
                    progress: bool = False) -> list[str]:
    """Greedy continuations of token-id prompts in batches (a decoder-only model's left-padded, so
    that every continuation starts at the end), decoded without special tokens."""
    device = next(model.parameters()).device
    decoder_only = not model.config.is_encoder_decoder
    texts = []
    starts = range(0, len(prompts), batch_size)
    for start in tqdm(starts, desc="generating", unit="batch", disable=not progress, leave=False):
        ids, mask = _pad(prompts[start : start + batch_size], device, left=decoder_only)
        out = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
            do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        )
        # a decoder-only model returns prompt + continuation, an encoder-decoder the decoder's tokens
        texts += tokenizer.batch_decode(out[:, ids.shape[1] :] if decoder_only else out, skip_special_tokens=True)
    return texts


class _PromptResponseEvaluator(ABC):
    """`evaluator(model) -> {"loss", "accuracy" | "exact_match", "n"}` on fixed prompt/response records;
    the subclasses say how a model reads a prompt and scores a candidate. `note` says how many records
    the length limit (`too_long`) truncated or skipped.

    With a closed label set every prompt leaves room for the longest candidate, and a candidate that
    alone does not fit is refused (it is the label set, not an outlier). Otherwise each record is cut
    as in training, its own response fitting whole: a prompt loses its start (seq2seq: its end), and a
    record whose response alone does not fit is skipped even under `truncate` (a cut reference would
    change the metric), counted in `note`.

    Exact match needs a generation per record, far slower than a loss: `max_generate` bounds it to a
    fixed random sample of that many records (`exact_match_n` says how many; the loss stays on all),
    and `max_new_tokens` caps each generation (below the longest reference response, a longer one
    cannot match). Each record generates at most as many tokens as its reference has (with eos),
    after the prompt its loss is computed with, in batches of records with similar budgets."""

    task: str
    shares_length: bool  # whether prompt and response share one sequence of at most max_length tokens

    def __init__(self, records, tokenizer, fields: Fields = DEFAULT_FIELDS, max_length: int = 256,
                 chat_template: bool = False, choices: Sequence[str] | None = None, batch_size: int = 16,
                 progress: bool = False, too_long: str = "truncate", max_generate: int | None = None,
                 max_new_tokens: int | None = None):
        self.tokenizer, self.batch_size, self.progress = tokenizer, batch_size, progress
        fields = resolve_format(records, self.task, fields)
        responses = [str(r[fields.response]) for r in records]
        self.choices = match_choices(choices, responses) if choices else None
        room = None
        if self.choices:
            self.cand_ids = [self._target(tokenizer, c) for c in self.choices]
            room = max(len(c) for c in self.cand_ids)
        self.features = self._features(records, tokenizer, fields, max_length, chat_template, too_long, room)
        self.note = self.features.note
        responses = [responses[i] for i in self.features.kept]
        self.prompts = [self._prompt(f) for f in self.features]
        if self.choices:
            index = {c.strip(): i for i, c in enumerate(self.choices)}
            self.gold = torch.tensor([index[r.strip()] for r in responses])
        else:
            # each record generates as many tokens as its reference has (a longer generation cannot match)
            budgets = [min(sum(t != IGNORE_INDEX for t in f["labels"]), max_new_tokens or max_length)
                       for f in self.features]
            self.responses, self.max_new = responses, max(budgets)
            n = len(self.prompts)
            self.generated = sorted(random.Random(0).sample(range(n), min(n, max_generate or n)))
            self.generation_batches = self._generation_batches(budgets, max_length)

    def _generation_batches(self, budgets: list[int], max_length: int) -> list[tuple[list[int], int]]:
        """`(records, new tokens)` per generation batch: the generated records by their budgets, at most
        `batch_size` a batch, and (causal LM) no more than fit within `max_length` after the batch's
        longest prompt, as every one of them fits after its own (positions stay within the model's)."""
        batches: list[tuple[list[int], int]] = []
        for i in sorted(self.generated, key=budgets.__getitem__):
            if batches:
                rows, _ = batches[-1]
                widest = max(len(self.prompts[j]) for j in (*rows, i)) if self.shares_length else 0
                if len(rows) < self.batch_size and widest + budgets[i] <= max_length:
                    batches[-1] = (rows + [i], budgets[i])
                    continue
            batches.append(([i], budgets[i]))
        return batches

    @abstractmethod
    def _target(self, tokenizer, response: str) -> list[int]:
        """The token ids of a response (a candidate) as the model is trained to produce it."""

    @abstractmethod
    def _features(self, records, tokenizer, fields, max_length, chat_template, too_long, room):
        """The records' features, each reference response whole; `room` (a closed label set): every
        prompt leaves that many tokens for a candidate, and a longer candidate is refused."""

    @abstractmethod
    def _prompt(self, feature: dict) -> list[int]:
        """What the model reads before the response."""

    @abstractmethod
    def score(self, model) -> torch.Tensor:
        """`(n_prompts, n_candidates)` summed log-likelihoods of the candidates."""

    @property
    def metric(self) -> str:
        return "accuracy" if self.choices else "exact_match"

    @torch.no_grad()
    def __call__(self, model) -> dict:
        n = len(self.prompts)
        if self.choices:
            scores = self.score(model)
            gold_lp = scores.gather(1, self.gold[:, None])[:, 0]
            n_tokens = sum(len(self.cand_ids[g]) for g in self.gold.tolist())
            accuracy = (scores.argmax(1) == self.gold).float().mean().item()
            return {"loss": -gold_lp.sum().item() / n_tokens, "accuracy": accuracy, "n": n}
        total, count = _token_nll(model, self.features, self.tokenizer.pad_token_id, self.batch_size, self.progress)
        hits = 0
        for rows, new_tokens in self.generation_batches:
            texts = greedy_generate(model, self.tokenizer, [self.prompts[i] for i in rows], new_tokens,
                                    self.batch_size, self.progress)
            hits += sum(t.strip() == self.responses[i].strip() for t, i in zip(texts, rows))
        return {"loss": total / count, "exact_match": hits / len(self.generated), "n": n,
                "exact_match_n": len(self.generated)}


class CausalLMEvaluator(_PromptResponseEvaluator):
    """A causal LM reads prompt + response within `max_length`: every prompt leaves room for the longest
    candidate, or for its own response, and a longer one loses its start (or the record is skipped or
    refused), as in training."""

    task = CAUSAL_LM
    shares_length = True

    def _target(self, tokenizer, response: str) -> list[int]:
        return response_ids(tokenizer, response)

    def _features(self, records, tokenizer, fields, max_length, chat_template, too_long, room):
        if room is not None and room >= max_length:
            raise UsageError(f"An evaluation candidate has {room} tokens (with eos), leaving no room for a prompt "
                             f"within --max-length {max_length}; raise it.")
        return causal_lm_features(records, tokenizer, max_length, fields, chat_template, too_long, room,
                                  cut_responses=False)

    def _prompt(self, feature: dict) -> list[int]:
        return feature["input_ids"][: feature["labels"].count(IGNORE_INDEX)]

    def score(self, model) -> torch.Tensor:
        return score_candidates(model, self.prompts, self.cand_ids, self.batch_size, self.progress)


class Seq2SeqEvaluator(_PromptResponseEvaluator):
    """An encoder-decoder reads the prompt in its encoder and each candidate (or the response) in its
    decoder, as its tokenizer encodes a target (`target_ids`): a prompt longer than `max_length` loses
    its end (or the record is skipped or refused), as in training; a response longer than `max_length`
    is skipped (or refused), a candidate refused."""

    task = SEQ2SEQ
    shares_length = False

    def _target(self, tokenizer, response: str) -> list[int]:
        return target_ids(tokenizer, response)

    def _features(self, records, tokenizer, fields, max_length, chat_template, too_long, room):
        if room is not None and room > max_length:
            raise UsageError(f"An evaluation candidate has {room} tokens (with eos), more than the decoder's "
                             f"--max-length {max_length}; raise it.")
        return prepare(records, tokenizer, SEQ2SEQ, fields, max_length, too_long, chat_template, cut_responses=False)

    def _prompt(self, feature: dict) -> list[int]:
        return feature["input_ids"]

    def score(self, model) -> torch.Tensor:
        return score_seq2seq_candidates(model, self.prompts, self.cand_ids, self.batch_size, self.progress)


class _FeaturesEvaluator:
    """An evaluator over tokenised features, batched; `note` says what the length limit did to the records."""

    def __init__(self, features: list[dict], pad_id: int, batch_size: int = 16, progress: bool = False,
                 note: str | None = None):
        self.features, self.pad_id, self.batch_size, self.progress = features, pad_id, batch_size, progress
        self.note = note


class LossEvaluator(_FeaturesEvaluator):
    """`evaluator(model) -> {"loss", "n"}`: the mean token cross-entropy of what training predicts, for
    text and conversation records (no single answer to score)."""

    metric = "loss"

    @torch.no_grad()
    def __call__(self, model) -> dict:
        total, count = _token_nll(model, self.features, self.pad_id, self.batch_size, self.progress)
        return {"loss": total / count, "n": len(self.features)}


class ClassificationEvaluator(_FeaturesEvaluator):
    """`evaluator(model) -> {"loss", "accuracy", "n"}` on tokenised classification features."""

    metric = "accuracy"

    @torch.no_grad()
    def __call__(self, model) -> dict:
        device = next(model.parameters()).device
        loss, hits = 0.0, 0
        starts = range(0, len(self.features), self.batch_size)
        for start in tqdm(starts, desc="evaluating", unit="batch", disable=not self.progress, leave=False):
            batch = {k: v.to(device) for k, v in collate(self.features[start : start + self.batch_size], self.pad_id).items()}
            labels = batch.pop("labels")
            logits = model(**batch).logits.float()
            loss += F.cross_entropy(logits, labels, reduction="sum").item()
            hits += int((logits.argmax(-1) == labels).sum())
        n = len(self.features)
        return {"loss": loss / n, "accuracy": hits / n, "n": n}


def make_evaluator(task: str, records, tokenizer, fields: Fields, max_length: int, chat_template: bool = False,
                   choices=None, label2id=None, batch_size: int = 16, progress: bool = False,
                   too_long: str = "truncate", max_generate: int | None = None, max_new_tokens: int | None = None):
    """The evaluator of `records` for `task`, by their format (`fields.format`, else detected)."""
    fields = resolve_format(records, task, fields)
    if fields.format == PROMPT_RESPONSE:
        evaluator = Seq2SeqEvaluator if task == SEQ2SEQ else CausalLMEvaluator
        return evaluator(records, tokenizer, fields, max_length, chat_template, choices, batch_size, progress, too_long,
                         max_generate, max_new_tokens)
    if choices and task != CLASSIFICATION:
        raise UsageError(f"--choices scores candidate responses, and {fields.format} records have none; drop it.")
    feats = prepare(records, tokenizer, task, fields, max_length, too_long, chat_template, label2id)
    if task == CLASSIFICATION:
        return ClassificationEvaluator(feats, tokenizer.pad_token_id, batch_size, progress, feats.note)
    return LossEvaluator(feats, tokenizer.pad_token_id, batch_size, progress, feats.note)
