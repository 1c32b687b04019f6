"""Loading a base model with a saved adapter (for `eval` and `merge`)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import PeftModel

from lora_one.core.errors import UsageError
from lora_one.core.parallel import resolve_device
from lora_one.core.save import SIDECAR
from lora_one.recipes.models import CLASSIFICATION, PEFT_TASK_TYPES, infer_task, load_model, resolve_model_path


def read_adapter_info(adapter_dir: str | Path) -> dict:
    """The `lora_one.json` sidecar of an adapter folder (`{}` for a plain PEFT adapter)."""
    folder = Path(adapter_dir)
    if not (folder / "adapter_config.json").is_file():
        raise UsageError(f"{str(folder)!r} is not an adapter folder (no adapter_config.json).")
    sidecar = folder / SIDECAR
    meta = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
    if "task" not in meta:
        task_type = json.loads((folder / "adapter_config.json").read_text()).get("task_type")
        task = {peft: ours for ours, peft in PEFT_TASK_TYPES.items()}.get(task_type)
        if task:
            meta["task"] = task
    return meta


def load_for_eval(model: str, adapter_dir: str | Path | None = None, task: str | None = None, device=None,
                  dtype: torch.dtype = torch.float32, quantize: str | None = None):
    """`(model in eval mode, tokenizer, task, adapter info)`: the base model (in `dtype`, or quantised as
    `load_model` does it), with the adapter if given."""
    meta = read_adapter_info(adapter_dir) if adapter_dir else {}
    task = task or meta.get("task") or infer_task(resolve_model_path(model))
    label2id = meta.get("label2id")
    if task == CLASSIFICATION and not label2id:
        raise UsageError(
            "Evaluating a classifier needs the adapter that trained its head, with the label names in "
            "its lora_one.json (give --adapter of a `lora-one finetune` run)."
        )
    device = device or resolve_device("auto")
    base, tokenizer, task = load_model(model, task, num_labels=len(label2id) if label2id else None, dtype=dtype,
                                       quantize=quantize, device=device)
    if label2id:
        base.config.label2id, base.config.id2label = label2id, {i: k for k, i in label2id.items()}
    net = PeftModel.from_pretrained(base, str(adapter_dir)) if adapter_dir else base
    net.to(device).eval()
    return net, tokenizer, task, meta
