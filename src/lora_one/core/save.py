"""Saving: a stock PEFT adapter plus LoRA-One's own metadata in a `lora_one.json` sidecar.

Whatever the variant, the adapter is for the ORIGINAL base model. The variants that change the base
weights get their own `save_pretrained` and `load_adapter` (`guard_original_base`), so the stock save
paths (`save_pretrained`, `transformers.Trainer`) write that adapter too, and read it back.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from importlib.metadata import version
from pathlib import Path

import torch
from huggingface_hub import ModelCard
from peft import PeftModel, set_peft_model_state_dict
from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, get_peft_model_state_dict
from safetensors.torch import load_file, save_file

from lora_one.core.deprecation import deprecated_arguments
from lora_one.core.errors import UsageError
from lora_one.core.files import ADAPTER, staged_folder
from lora_one.core.parallel import is_main_process

SIDECAR = "lora_one.json"
STEP0_ADAPTER = "lora_one_step0"  # the name PEFT's conversion loads the step-0 factors under


def _is_factor(key: str) -> bool:
    return ".lora_A." in key or ".lora_B." in key


def _save_converted(peft_model: PeftModel, adapter: str, folder: Path) -> None:
    """Save `adapter` for the ORIGINAL base: PEFT's rank-2r conversion of the factors
    (`path_initial_model_for_weight_conversion`: `[A; A0]`, `[B, -B0]`, from the step-0 factors that
    `init_lora_one` kept), plus every other trained entry, which that conversion drops although it stays
    valid as it is: a `modules_to_save` head, trained biases, DoRA's magnitude (it scales the rows of
    `W + s B A`, and the original base plus the converted adapter is the same matrix)."""
    others = {k: v for k, v in get_peft_model_state_dict(peft_model, adapter_name=adapter).items()
              if not _is_factor(k)}
    with tempfile.TemporaryDirectory() as conv:
        step0 = Path(conv) / STEP0_ADAPTER
        step0.mkdir()
        factors = {k.replace(f".{adapter}.", "."): v for k, v in peft_model.lora_one_initial_state.items()}
        # PEFT's loader wants the head too (it is loaded, unused, and deleted); it writes the config.
        save_file({**factors, **others}, step0 / SAFETENSORS_WEIGHTS_NAME)
        type(peft_model).save_pretrained(  # the class's: init_lora_one patched the instance's
            peft_model, str(folder), selected_adapters=[adapter],
            path_initial_model_for_weight_conversion=str(step0),
        )
    weights = (folder if adapter == "default" else folder / adapter) / SAFETENSORS_WEIGHTS_NAME
    save_file({**load_file(weights), **others}, weights, metadata={"format": "pt"})


@deprecated_arguments(old_positional=("extra", "base_model_name"))
def save_adapter(peft_model: PeftModel, out_dir: str | os.PathLike, *, extra: dict | None = None,
                 base_model_name: str | None = None) -> Path:
    """Save a stock PEFT adapter for the UNTOUCHED base model, and the sidecar `lora_one.json`.

    For variants that rewrote the base weight (`lora-one-v1`, `lora-ga`, `pissa`) this is PEFT's
    converted rank-2r adapter (`path_initial_model_for_weight_conversion`), so the saved folder always
    loads with `PeftModel.from_pretrained(original_base, out_dir)`. Only rank 0 of a distributed job
    writes. The files are written to a temporary sibling and published by `lora_one.core.files`' rules: an
    existing `out_dir` keeps every file that is not ours, and `adapter_config.json` comes last, so an
    interrupted save never leaves a folder that looks complete.

    Args:
        peft_model: the PEFT model; its active adapter is saved, with its `lora_one_metadata`.
        out_dir: the adapter's folder (made if missing).
        extra: more entries for the sidecar.
        base_model_name: the base model named in `adapter_config.json` and the model card (e.g. a Hub
            id) instead of the local path it was loaded from, so the adapter names a base that loads on
            another machine.

    Returns:
        `out_dir` as a `Path`.

    Raises:
        UsageError: `out_dir` cannot be an output folder (a file, the home or root folder, not writable) or
            holds a folder where a file of the adapter goes.
    """
    out = Path(out_dir)
    if not is_main_process():  # under torch.distributed every rank holds the same adapter
        return out
    adapter = peft_model.active_adapter
    meta = dict(getattr(peft_model, "lora_one_metadata", None) or {})
    meta.update(extra or {})
    with staged_folder(out, ADAPTER) as tmp:
        initial = getattr(peft_model, "lora_one_initial_state", None)
        if initial is not None:
            _save_converted(peft_model, adapter, tmp)
            meta["converted_rank_2r"] = True
        else:
            type(peft_model).save_pretrained(peft_model, str(tmp), selected_adapters=[adapter])
        if base_model_name:
            _name_base_model(tmp, adapter, base_model_name)
        (tmp / SIDECAR).write_text(sidecar_text(meta))
    return out


def sidecar_text(meta: dict) -> str:
    """The `lora_one.json` sidecar: the init metadata and the versions that wrote it."""
    return json.dumps({**meta, "lora_one_version": version("lora-one"), "peft_version": version("peft")}, indent=2) + "\n"


def _name_base_model(folder: Path, adapter: str, name: str) -> None:
    """Record `name` as the base model of `adapter`, saved by PEFT in `folder` (config and model card).
    Not set on the PeftModel before saving: PEFT would then look the name up on the Hub."""
    config = (folder if adapter == "default" else folder / adapter) / CONFIG_NAME
    config.write_text(json.dumps({**json.loads(config.read_text()), "base_model_name_or_path": name},
                                 indent=2, sort_keys=True))
    card = ModelCard.load(folder / "README.md")
    card.data.base_model = name
    card.save(folder / "README.md")


def guard_original_base(peft_model: PeftModel) -> None:
    """Give a PeftModel whose init changed the base weights (`init_lora_one` calls this) its own
    `save_pretrained` and `load_adapter`, so that the stock save paths write the adapter for the
    original base and reading such a folder back (a Trainer checkpoint) continues the same training."""
    peft_model.save_pretrained = SavePretrainedForOriginalBase(peft_model)
    peft_model.load_adapter = LoadAdapterForOriginalBase(peft_model)


class SavePretrainedForOriginalBase:
    """`save_pretrained` of a base-changing variant's PeftModel: it writes what `save_adapter` writes,
    the adapter for the ORIGINAL base, so that a habitual `peft_model.save_pretrained(...)` or
    `transformers.Trainer.save_model()` never yields PEFT's own adapter, which fits only the residual
    base this model now holds. That one is still available with `for_residual_base=True`. Warns once."""

    def __init__(self, peft_model: PeftModel):
        self.peft_model = peft_model
        self.warned = False

    def __call__(self, save_directory: str | os.PathLike, *, for_residual_base: bool = False, **kwargs):
        model = self.peft_model
        if for_residual_base or model.lora_one_initial_state is None:
            return type(model).save_pretrained(model, save_directory, **kwargs)
        if not kwargs.pop("is_main_process", True):
            return None
        plain = {"selected_adapters": (None, [model.active_adapter]), "state_dict": (None,),
                 "safe_serialization": (True,)}
        other = sorted(k for k, v in kwargs.items() if k not in plain or v not in plain[k])
        if other:  # a sharded state_dict, another adapter, pickle: save_adapter does not do them
            raise UsageError(
                f"save_pretrained of a base-changing LoRA-One model writes the adapter for the original base "
                f"with lora_one.save_adapter, which does not take {', '.join(other)}; drop them, or pass "
                "for_residual_base=True for PEFT's own adapter of the residual base."
            )
        if not self.warned:
            warnings.warn(
                f"save_pretrained({str(save_directory)!r}) writes the adapter for the ORIGINAL base model (PEFT's "
                "converted rank-2r adapter, as lora_one.save_adapter does): this model's init changed its base "
                "weights, so PEFT's own adapter would be wrong for the original base. Pass "
                "for_residual_base=True for that one.", stacklevel=2,
            )
            self.warned = True
        save_adapter(model, save_directory)
        return None


class LoadAdapterForOriginalBase:
    """`load_adapter` of a base-changing variant's PeftModel. A folder saved for the original base (by
    `save_adapter` or the patched `save_pretrained`, e.g. a Trainer checkpoint) holds `[A; A0]` and
    `[B, -B0]`; loaded into this model's own adapter, it gives back `A`, `B` and the head once `A0`,
    `B0` are checked to be this model's step-0 factors, so `Trainer.train(resume_from_checkpoint=...)`
    continues exactly. Anything else goes to PEFT's `load_adapter`."""

    def __init__(self, peft_model: PeftModel):
        self.peft_model = peft_model

    def __call__(self, model_id: str | os.PathLike, adapter_name: str, is_trainable: bool = False, **kwargs):
        model, folder = self.peft_model, Path(model_id)
        sidecar = folder / SIDECAR
        converted = sidecar.is_file() and json.loads(sidecar.read_text()).get("converted_rank_2r")
        if kwargs or not converted or adapter_name != model.active_adapter or model.lora_one_initial_state is None:
            return type(model).load_adapter(model, model_id, adapter_name, is_trainable=is_trainable, **kwargs)
        step0 = {k.replace(f".{adapter_name}.", "."): v for k, v in model.lora_one_initial_state.items()}
        saved = load_file(folder / SAFETENSORS_WEIGHTS_NAME)
        differ = sorted(set(step0) ^ {k for k in saved if _is_factor(k)})
        if differ:
            raise UsageError(f"{str(folder)!r} holds other LoRA layers than this model ({differ[0]!r}); load it "
                             "into the model it was trained from.")
        state = {k: v for k, v in saved.items() if not _is_factor(k)}
        for key, initial in step0.items():
            r = initial.shape[0] if ".lora_A." in key else initial.shape[1]
            value = saved[key]  # [A; A0] along lora_A's rank (dim 0), [B, -B0] along lora_B's (dim 1)
            trained, tail = (value[:r], value[r:]) if ".lora_A." in key else (value[:, :r], -value[:, r:])
            if not torch.equal(tail.to(initial), initial):
                raise UsageError(
                    f"{str(folder)!r} was saved from another init than this model's (its step-0 factors differ at "
                    f"{key!r}); build the model with the same data, seed and settings before loading it."
                )
            state[key] = trained
        return set_peft_model_state_dict(model, state, adapter_name=adapter_name)
