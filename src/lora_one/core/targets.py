"""Which `nn.Linear` layers a LoRA-One init targets, matched exactly the way PEFT matches them."""

from __future__ import annotations

from peft import LoraConfig, PeftModel
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import _maybe_include_all_linear_layers, check_target_module_exists
from peft.utils import INCLUDE_LINEAR_LAYERS_SHORTHAND, TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn

from lora_one.core.errors import UsageError


def base_model_of(model: nn.Module) -> nn.Module:
    """The transformers model under a `PeftModel`, or the model itself."""
    return model.get_base_model() if isinstance(model, PeftModel) else model


def lora_layers(model: nn.Module) -> dict[str, LoraLayer]:
    """`{name in the base model: LoRA layer}` for every LoRA layer of a PEFT model."""
    return {n: m for n, m in base_model_of(model).named_modules() if isinstance(m, LoraLayer)}


def _peft_default_targets(base: nn.Module) -> str | list[str]:
    """What PEFT's `LoraConfig(target_modules=None)` targets on `base`: its per-architecture default
    (q_proj and v_proj on Llama), as `LoraModel._prepare_adapter_config` resolves it."""
    model_type = getattr(getattr(base, "config", None), "model_type", None)
    targets = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type)
    if targets is None:
        raise UsageError(f"target_modules=None: PEFT has no default target modules for model type {model_type!r}; "
                         "name them, e.g. 'all-linear' or ['q_proj', 'v_proj'].")
    return targets


def find_target_linears(model: nn.Module, target_modules=INCLUDE_LINEAR_LAYERS_SHORTHAND) -> dict[str, nn.Linear]:
    """`{name: nn.Linear}` of the layers LoRA would adapt.

    On a model that already carries LoRA layers, the targets are their base layers, which PEFT chose from
    the whole `LoraConfig`; a list or regex `target_modules` keeps those it matches. Otherwise
    `target_modules` is matched as PEFT's `LoraConfig` matches it: `"all-linear"` leaves out the output
    head and a classifier head, `None` means PEFT's default for the architecture (`_peft_default_targets`).
    """
    base = base_model_of(model)
    layers = lora_layers(model)
    if layers:
        targets = {n: m.get_base_layer() for n, m in layers.items()}
        if target_modules not in (None, INCLUDE_LINEAR_LAYERS_SHORTHAND):
            config = LoraConfig(target_modules=target_modules)
            targets = {n: m for n, m in targets.items() if check_target_module_exists(config, n)}
    else:
        seq_cls = type(base).__name__.endswith("ForSequenceClassification")
        if target_modules is None:
            target_modules = _peft_default_targets(base)
        config = LoraConfig(target_modules=target_modules, task_type="SEQ_CLS" if seq_cls else None)
        config = _maybe_include_all_linear_layers(config, base)
        targets = {
            n: m
            for n, m in base.named_modules()
            if isinstance(m, nn.Linear) and check_target_module_exists(config, n)
        }
    if not targets:
        raise UsageError(
            f"No nn.Linear layer of {type(base).__name__} matches target_modules={target_modules!r}. "
            "Use 'all-linear' or names from model.named_modules(), e.g. ['q_proj', 'v_proj']."
        )
    return targets
