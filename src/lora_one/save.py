"""Saving: a stock PEFT adapter plus LoRA-One's own metadata in a `lora_one.json` sidecar."""

from __future__ import annotations

import json
import os
import tempfile
from importlib.metadata import version
from pathlib import Path

from peft import PeftModel, set_peft_model_state_dict

from lora_one.files import ADAPTER, staged_folder
from lora_one.parallel import is_main_process

SIDECAR = "lora_one.json"


def _save_initial_adapter(peft_model: PeftModel, adapter: str, folder: Path) -> None:
    """Write the step-0 factors as an adapter PEFT's rank-2r conversion can read."""
    current = {k: v.detach().clone() for k, v in peft_model.named_parameters() if ".lora_" in k}
    state = peft_model.lora_one_initial_state
    with_prefix = {k.replace(f".{adapter}.", "."): v for k, v in state.items()}
    set_peft_model_state_dict(peft_model, with_prefix, adapter_name=adapter)
    try:
        peft_model.save_pretrained(str(folder), selected_adapters=[adapter])
    finally:
        params = dict(peft_model.named_parameters())
        for k, v in current.items():
            params[k].data.copy_(v)


def save_adapter(peft_model: PeftModel, out_dir: str | os.PathLike, extra: dict | None = None) -> Path:
    """Save a stock PEFT adapter for the UNTOUCHED base model, and the sidecar.

    For variants that rewrote the base weight (`lora-one-v1`, `lora-ga`, `pissa`) this is PEFT's
    converted rank-2r adapter (`path_initial_model_for_weight_conversion`), so the saved folder always
    loads with `PeftModel.from_pretrained(original_base, out_dir)`. Only rank 0 of a distributed job
    writes. The files are written to a temporary sibling and published by `lora_one.files`' rules: an
    existing `out_dir` keeps every file that is not ours, and `adapter_config.json` comes last, so an
    interrupted save never leaves a folder that looks complete.
    """
    out = Path(out_dir)
    if not is_main_process():  # under torch.distributed every rank holds the same adapter
        return out
    adapter = peft_model.active_adapter
    meta = dict(getattr(peft_model, "lora_one_metadata", None) or {})
    meta.update(extra or {})
    meta["lora_one_version"] = version("lora-one")
    meta["peft_version"] = version("peft")
    with staged_folder(out, ADAPTER) as tmp:
        initial = getattr(peft_model, "lora_one_initial_state", None)
        if initial is not None:
            with tempfile.TemporaryDirectory() as conv:
                init_dir = Path(conv) / "initial"
                _save_initial_adapter(peft_model, adapter, init_dir)
                sub = init_dir / adapter if adapter != "default" else init_dir
                peft_model.save_pretrained(
                    str(tmp), path_initial_model_for_weight_conversion=str(sub),
                    selected_adapters=[adapter],
                )
            meta["converted_rank_2r"] = True
        else:
            peft_model.save_pretrained(str(tmp), selected_adapters=[adapter])
        (tmp / SIDECAR).write_text(json.dumps(meta, indent=2) + "\n")
    return out
