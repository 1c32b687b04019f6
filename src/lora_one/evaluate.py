"""Held-out evaluation: loss and the task metric, batched.

- Classification: cross-entropy and accuracy of the argmax class.
- Causal LM with a closed label set (`--choices`, the run's recorded choices, or responses that take
  few distinct values): each candidate response (with its eos, exactly as training saw it) is scored
  by its summed log-likelihood after the prompt; the prediction is the best candidate. The loss is
  the mean token cross-entropy of the gold responses, as in training.
- Causal LM otherwise: the same loss, and exact match of greedy generations (whitespace-stripped).

Candidate scoring shares work: the prompts' common token prefix (e.g. an instruction) runs once per
batch, each prompt once, and each candidate only over its own tokens, through the KV cache; the result
equals scoring every (prompt, candidate) pair with a full forward pass (tested).
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from lora_one.config import check_writable, complete_model_settings
from lora_one.data import (
    IGNORE_INDEX,
    Fields,
    causal_lm_features,
    classification_features,
    collate,
    read_records,
    response_ids,
)
from lora_one.errors import UsageError
from lora_one.files import write_text_atomic
from lora_one.models import CAUSAL_LM
from lora_one.parallel import resolve_device

MAX_CHOICES = 32


def infer_choices(responses: Sequence[str]) -> list[str] | None:
    """The closed label set of a causal-LM data set, or None when the responses look open-ended:
    at most `MAX_CHOICES` distinct values, each seen on average at least twice."""
    distinct = sorted(set(responses))
    if len(distinct) <= MAX_CHOICES and 2 * len(distinct) <= len(responses):
        return distinct
    return None


def parse_choices(text: str) -> list[str]:
    """The `--choices` flag: a comma-separated label set, empty items dropped."""
    return [c for c in text.split(",") if c.strip()]


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
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # less padding per batch
    scores = torch.empty(len(prompts), n_cand)
    starts = range(0, len(prompts), batch_size)
    for start in tqdm(starts, desc="scoring", unit="batch", disable=not progress, leave=False):
        rows = order[start : start + batch_size]
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


def _token_nll(model, features: list[dict], pad_id: int, batch_size: int, progress: bool = False) -> tuple[float, int]:
    """Summed token cross-entropy of `labels` (prompt masked) and the number of tokens."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    starts = range(0, len(features), batch_size)
    for start in tqdm(starts, desc="loss", unit="batch", disable=not progress, leave=False):
        batch = {k: v.to(device) for k, v in collate(features[start : start + batch_size], pad_id).items()}
        labels = batch.pop("labels")
        logits = model(**batch).logits[:, :-1].float()
        target = labels[:, 1:]
        total += F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=IGNORE_INDEX, reduction="sum").item()
        count += int((target != IGNORE_INDEX).sum())
    return total, count


@torch.no_grad()
def greedy_generate(model, tokenizer, prompts: Sequence[Sequence[int]], max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy continuations of token-id prompts (left-padded in batches), decoded without special tokens."""
    device = next(model.parameters()).device
    texts = []
    for start in range(0, len(prompts), batch_size):
        ids, mask = _pad(prompts[start : start + batch_size], device, left=True)
        width = ids.shape[1]
        out = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
            do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        )
        texts += tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    return texts


class CausalLMEvaluator:
    """`evaluator(model) -> {"loss", "accuracy" | "exact_match", "n"}` on fixed prompt/response records.

    Every prompt leaves room for the longest candidate (or, for generation, the longest response)
    within `max_length`; longer records are truncated (the prompt's start), skipped or refused as
    `too_long` says, as in training, and `note` says how many.
    """

    def __init__(self, records, tokenizer, fields: Fields = Fields(), max_length: int = 256,
                 chat_template: bool = False, choices: Sequence[str] | None = None, batch_size: int = 16,
                 progress: bool = False, too_long: str = "truncate"):
        self.tokenizer, self.batch_size, self.progress = tokenizer, batch_size, progress
        responses = [str(r[fields.response]) for r in records]
        self.choices = match_choices(choices, responses) if choices else None
        if self.choices:
            self.cand_ids = [response_ids(tokenizer, c) for c in self.choices]
            room = max(len(c) for c in self.cand_ids)
        else:
            room = max(len(response_ids(tokenizer, r)) for r in responses)
        if room >= max_length:
            raise UsageError(f"An evaluation {'candidate' if self.choices else 'response'} has {room} tokens (with "
                             f"eos), leaving no room for a prompt within --max-length {max_length}; raise it.")
        self.features = causal_lm_features(records, tokenizer, max_length, fields, chat_template, too_long, room)
        self.note = self.features.note
        responses = [responses[i] for i in self.features.kept]
        self.prompts = [f["input_ids"][: f["labels"].count(IGNORE_INDEX)] for f in self.features]
        if self.choices:
            index = {c.strip(): i for i, c in enumerate(self.choices)}
            self.gold = torch.tensor([index[r.strip()] for r in responses])
        else:
            self.responses, self.max_new = responses, room

    @property
    def metric(self) -> str:
        return "accuracy" if self.choices else "exact_match"

    @torch.no_grad()
    def __call__(self, model) -> dict:
        n = len(self.prompts)
        if self.choices:
            scores = score_candidates(model, self.prompts, self.cand_ids, self.batch_size, self.progress)
            gold_lp = scores.gather(1, self.gold[:, None])[:, 0]
            n_tokens = sum(len(self.cand_ids[g]) for g in self.gold.tolist())
            accuracy = (scores.argmax(1) == self.gold).float().mean().item()
            return {"loss": -gold_lp.sum().item() / n_tokens, "accuracy": accuracy, "n": n}
        total, count = _token_nll(model, self.features, self.tokenizer.pad_token_id, self.batch_size, self.progress)
        texts = greedy_generate(model, self.tokenizer, self.prompts, self.max_new, self.batch_size)
        hits = sum(t.strip() == r.strip() for t, r in zip(texts, self.responses))
        return {"loss": total / count, "exact_match": hits / n, "n": n}


class ClassificationEvaluator:
    """`evaluator(model) -> {"loss", "accuracy", "n"}` on tokenised classification features."""

    metric = "accuracy"

    def __init__(self, features: list[dict], pad_id: int, batch_size: int = 32, progress: bool = False,
                 note: str | None = None):
        self.features, self.pad_id, self.batch_size, self.progress = features, pad_id, batch_size, progress
        self.note = note  # what the length limit did to the records

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
                   too_long: str = "truncate"):
    if task == CAUSAL_LM:
        return CausalLMEvaluator(records, tokenizer, fields, max_length, chat_template, choices, batch_size, progress,
                                 too_long)
    feats = classification_features(records, tokenizer, max_length, label2id, fields, too_long)
    return ClassificationEvaluator(feats, tokenizer.pad_token_id, batch_size, progress, feats.note)


# ---------------------------------------------------------------- `lora-one eval`


def add_eval_parser(sub) -> None:
    from lora_one.cli import add_model_data_args  # noqa: PLC0415 (cli imports this module)

    p = sub.add_parser("eval", help="held-out loss and accuracy (or exact match) of a base model + adapter")
    add_model_data_args(p)
    p.add_argument("--adapter", help="adapter folder (from finetune); without it, the base model is evaluated")
    p.add_argument("--choices", help="comma-separated closed label set for a causal LM (default: the run's, "
                   "or inferred from the responses)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", help="JSON file for the results (default: ADAPTER/eval.json, or print only)")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args) -> dict:
    from lora_one.cli import fields_of  # noqa: PLC0415
    from lora_one.load import load_for_eval  # noqa: PLC0415

    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}.")
    out = Path(args.out) if args.out else (Path(args.adapter) / "eval.json" if args.adapter else None)
    if out is not None:  # before the evaluation, which may be long
        if out.is_dir():
            raise UsageError(f"--out {str(out)!r} is a folder; give the path of a JSON file.")
        check_writable(out)
    complete_model_settings(args)
    model, tokenizer, task, meta = load_for_eval(args.model, args.adapter, args.task, resolve_device(args.device))
    fields = fields_of(args)
    records = read_records(args.data, task, fields)
    chat_template = args.chat_template or bool(meta.get("chat_template"))
    choices = None
    if task == CAUSAL_LM:
        choices = (
            parse_choices(args.choices) if args.choices
            else meta.get("choices") or infer_choices([str(r[fields.response]) for r in records])
        )
    evaluator = make_evaluator(task, records, tokenizer, fields, args.max_length, chat_template, choices,
                               meta.get("label2id"), args.batch_size, progress=True, too_long=args.too_long)
    if evaluator.note:
        print(f"{args.data}: {evaluator.note}", flush=True)
    model.eval()
    results = {"model": args.model, "adapter": args.adapter, "data": str(args.data), "task": task,
               "metric": evaluator.metric, **evaluator(model)}
    width = max(len(k) for k in results)
    for k, v in results.items():
        print(f"{k:<{width}}  {v:.4f}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    if out is not None:
        write_text_atomic(out, json.dumps(results, indent=2) + "\n")
        print(f"wrote {out}")
    return results
