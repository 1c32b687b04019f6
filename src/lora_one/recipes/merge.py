"""Merging: fold an adapter into its base model and save a plain Hugging Face model folder."""

from __future__ import annotations

from pathlib import Path

import torch

from lora_one.core.files import MODEL, staged_folder
from lora_one.recipes.load import load_for_eval


def merge_adapter(model: str, adapter_dir: str | Path, out_dir: str | Path, task: str | None = None) -> Path:
    """Save `base + adapter` as an ordinary model folder (weights merged, no PEFT needed to load it).

    Published by `lora_one.core.files`' rules: into an existing folder only our files move, an older
    save's weight shards go, and `config.json` comes last.
    """
    peft_model, tokenizer, task, _ = load_for_eval(model, adapter_dir, task, device=torch.device("cpu"))
    merged = peft_model.merge_and_unload()
    with staged_folder(out_dir, MODEL) as tmp:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return Path(out_dir)
