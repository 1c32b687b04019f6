"""The `init` and `eval` recipes, and what they share with `finetune`: the model and data of a run's
settings, its `LoraConfig`, the defaults that depend on the machine or the model, its output folder."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from peft import LoraConfig

from lora_one.core.constants import BASE_CHANGING_VARIANTS
from lora_one.core.errors import UsageError
from lora_one.core.files import check_out_folder, check_writable, write_text_atomic
from lora_one.core.init import get_lora_one_model
from lora_one.core.parallel import is_main_process, resolve_device
from lora_one.core.save import save_adapter
from lora_one.recipes.data import init_batches, label_mapping, prepare, read_records
from lora_one.recipes.evaluate import choices_of, make_evaluator
from lora_one.recipes.load import load_for_eval
from lora_one.recipes.models import (
    CLASSIFICATION,
    DTYPES,
    HUB_IDS,
    PEFT_TASK_TYPES,
    infer_task,
    load_model,
    max_positions,
    resolve_model_path,
)
from lora_one.recipes.settings import DataSettings, EvalSettings, InitSettings

# --max-length when not given, unless the model has fewer positions.
DEFAULT_MAX_LENGTH = 256
# Batch size of `init`'s gamma search, forward passes only (`finetune` takes its --eval-batch-size).
SEARCH_BATCH_SIZE = 16


def complete_model_settings(s: DataSettings) -> None:
    """Check the device against the machine and fill `device="auto"` (with the kind of device: under a
    launcher each process takes its own index), the default `grad_mode` (`InitSettings.lora_one_config`)
    and `max_length` (256, or fewer when the model has fewer positions); refuse a `max_length` above the
    model's positions, and on a quantised base an init that needs weight gradients or rewrites the weights.
    In place, so that `args.json` records them."""
    device = resolve_device(s.device)
    if s.device == "auto":
        s.device = device.type
    if isinstance(s, InitSettings):
        if s.quantize:
            _check_quantized_init(s)
        s.grad_mode = s.lora_one_config().grad_mode
    positions = max_positions(resolve_model_path(s.model))
    if s.max_length is None:
        s.max_length = min(DEFAULT_MAX_LENGTH, positions or DEFAULT_MAX_LENGTH)
    elif positions and s.max_length > positions:
        raise UsageError(f"--max-length {s.max_length} exceeds the model's {positions} positions "
                         f"(max_position_embeddings); give --max-length {positions} or less.")


def _check_quantized_init(s: InitSettings) -> None:
    """A quantised weight takes no gradient and no in-place update: only sketch mode (which never forms a
    weight gradient) and the variants that leave the base as it is work on it."""
    if s.variant in BASE_CHANGING_VARIANTS:
        raise UsageError(f"--variant {s.variant} rewrites the base weights, which --quantize {s.quantize} makes "
                         "read-only; use lora-one, spectral or lora (or drop --quantize).")
    if s.grad_mode not in (None, "sketch"):
        raise UsageError(f"--grad-mode {s.grad_mode} needs the gradient of the weights, which --quantize {s.quantize} "
                         "weights cannot take; use --grad-mode sketch (the default with --quantize), which never "
                         "forms it.")


def base_model_name_of(s: InitSettings) -> str | None:
    """The base model the saved adapter names (None: PEFT's default, the folder the model came from)."""
    return s.base_model_name or HUB_IDS.get(s.model)


def lora_config_of(s: InitSettings, task: str) -> LoraConfig:
    return LoraConfig(
        r=s.rank,
        lora_alpha=s.alpha,
        use_rslora=s.rslora,
        use_dora=s.dora,
        target_modules=s.target_modules,
        lora_dropout=0.0,
        task_type=PEFT_TASK_TYPES[task],
    )


def check_out_dir(out: str | Path, overwrite: bool) -> None:
    """Refuse, before any work, an out folder that cannot be one or holds files (unless `overwrite`)."""
    out = Path(out)
    check_out_folder(out)
    check_writable(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UsageError(f"--out {str(out)!r} exists and is not empty; pass --overwrite or choose another folder.")


def load_task_data(s: DataSettings, path: str):
    """`(model, tokenizer, task, records, features, label2id)` for the training data at `path`;
    `records[i]` is the record of `features[i]` (records skipped as too long are dropped from both)."""
    task = s.task or infer_task(resolve_model_path(s.model))
    fields = s.fields
    records = read_records(path, task, fields)
    label2id = label_mapping(records, fields) if task == CLASSIFICATION else None
    model, tokenizer, task = load_model(s.model, task, num_labels=len(label2id) if label2id else None,
                                        dtype=DTYPES[s.dtype], quantize=s.quantize, device=resolve_device(s.device))
    if label2id:
        model.config.label2id, model.config.id2label = label2id, {i: k for k, i in label2id.items()}
    feats = prepare(records, tokenizer, task, fields, s.max_length, s.too_long, s.chat_template, label2id)
    if feats.note and is_main_process():
        print(f"{path}: {feats.note}", flush=True)
    records = [records[i] for i in feats.kept]
    return model, tokenizer, task, records, feats, label2id


def gamma_line(meta: dict) -> str:
    """What a gamma search chose, in one line."""
    search = meta["gamma_search"]
    losses = ", ".join(f"{g:g}: {'-' if v is None else f'{v:.4f}'}" for g, v in zip(search["grid"], search["losses"]))
    return (f"gamma search on {search['samples']} held-out examples chose {meta['gamma']:g} (step-0 loss by gamma: "
            f"{losses}; without a step {search['loss_without_step']:.4f})")


def run_init(s: InitSettings) -> dict:
    """`lora-one init`: compute the init on `init_samples` training examples and save the step-0
    adapter (for the original base) with its sidecar; returns the init metadata."""
    s = dataclasses.replace(s)
    s.check()
    check_out_dir(s.out, s.overwrite)
    complete_model_settings(s)
    torch.manual_seed(s.seed)
    model, tokenizer, task, _, feats, _ = load_task_data(s, s.data)
    model.to(s.device)
    batches = init_batches(feats, s.init_samples, s.init_batch_size, s.seed, tokenizer.pad_token_id,
                           search_batch_size=SEARCH_BATCH_SIZE if s.gamma_search else None)
    peft_model = get_lora_one_model(model, lora_config_of(s, task), batches, config=s.lora_one_config())
    if "gamma_search" in peft_model.lora_one_metadata:
        print(gamma_line(peft_model.lora_one_metadata), flush=True)
    save_adapter(peft_model, s.out, extra={"model": s.model, "data": str(s.data), "task": task},
                 base_model_name=base_model_name_of(s))
    return peft_model.lora_one_metadata


def run_eval(s: EvalSettings) -> dict:
    """`lora-one eval`: the held-out loss and task metric of the base model, with the adapter if one
    is given; written to `s.out` (default ADAPTER/eval.json) atomically."""
    s.check()
    out = Path(s.out) if s.out else (Path(s.adapter) / "eval.json" if s.adapter else None)
    if out is not None:  # before the evaluation, which may be long
        if out.is_dir():
            raise UsageError(f"--out {str(out)!r} is a folder; give the path of a JSON file.")
        check_writable(out)
    s = dataclasses.replace(s)
    complete_model_settings(s)
    model, tokenizer, task, meta = load_for_eval(s.model, s.adapter, s.task, resolve_device(s.device),
                                                 DTYPES[s.dtype], s.quantize)
    fields = s.fields
    records = read_records(s.data, task, fields)
    chat_template = s.chat_template or bool(meta.get("chat_template"))
    choices = choices_of(records, task, fields, s.choices, meta.get("choices"))
    evaluator = make_evaluator(task, records, tokenizer, fields, s.max_length, chat_template, choices,
                               meta.get("label2id"), s.batch_size, progress=True, too_long=s.too_long,
                               max_generate=s.generate_samples, max_new_tokens=s.max_new_tokens)
    if evaluator.note:
        print(f"{s.data}: {evaluator.note}", flush=True)
    model.eval()
    results = {"model": s.model, "adapter": s.adapter, "data": str(s.data), "task": task,
               "metric": evaluator.metric, **evaluator(model),
               "data_notes": {"evaluation": evaluator.note} if evaluator.note else {}}
    if out is not None:
        write_text_atomic(out, json.dumps(results, indent=2) + "\n")
        results["written_to"] = str(out)
    return results
