"""The training optimizer: AdamW, or AdamW behind PEFT's Riemannian preconditioner."""

from __future__ import annotations

from typing import Any

import torch
from peft.optimizers import create_riemannian_optimizer
from torch import nn

from lora_one.core.constants import DEFAULT_PREC_REG
from lora_one.core.deprecation import deprecated_arguments
from lora_one.core.errors import UsageError


@deprecated_arguments(old_positional=("precondition", "reg", "weight_decay", "lora_plus_ratio"))
def create_optimizer(
    peft_model: nn.Module,
    lr: float,
    *,
    precondition: bool = False,
    prec_reg: float = DEFAULT_PREC_REG,
    weight_decay: float = 0.0,
    lora_plus_ratio: float = 1.0,
    **adamw_kwargs: Any,
) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; with `precondition=True`, each LoRA pair's gradients are
    first multiplied by `(B^T B + prec_reg I)^-1` (for A) and `(A A^T + prec_reg I)^-1` (for B).

    The preconditioner is PEFT's `create_riemannian_optimizer`, which pairs `lora_A`/`lora_B` by name,
    computes the `r x r` inverses in fp32 from the factors before the step and never falls back to
    plain AdamW. It inverts with `pinv`, which equals the spec's solve whenever `B^T B + prec_reg I` is
    well conditioned (tested against `lora_one.linalg.preconditioner.precondition`).

    Args:
        peft_model: the PEFT model whose trainable parameters are optimised.
        lr: the learning rate.
        precondition: multiply each LoRA pair's gradients by the Riemannian preconditioner first.
        prec_reg: the preconditioner's damping (`--prec-reg` on the command line); `DEFAULT_PREC_REG`.
        weight_decay: AdamW's, 0 by default as in the authors' recipe and `lora-one finetune` (torch's
            AdamW would decay by 0.01).
        lora_plus_ratio: LoRA+: the `lora_B` factors learn at `ratio * lr`.
        **adamw_kwargs: other AdamW arguments (betas, eps, ...), as they are.

    Returns:
        The optimizer; build the learning-rate schedule on it after the init.

    Raises:
        UsageError: a learning rate that is not positive, a negative damping, a LoRA+ ratio that is not
            positive, or no trainable parameters.
    """
    if not lr > 0:
        raise UsageError(f"learning rate must be positive, got {lr}.")
    if not prec_reg >= 0:
        raise UsageError(f"preconditioner damping prec_reg must be >= 0, got {prec_reg}.")
    if not lora_plus_ratio > 0:
        raise UsageError(f"lora_plus_ratio must be > 0, got {lora_plus_ratio}.")
    if precondition:
        opt = create_riemannian_optimizer(peft_model, torch.optim.AdamW, lr=lr, reg=prec_reg,
                                          weight_decay=weight_decay, **adamw_kwargs)
    else:
        params = [p for p in peft_model.parameters() if p.requires_grad]
        if not params:
            raise UsageError("The model has no trainable parameters; wrap it with PEFT first.")
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, **adamw_kwargs)
    if lora_plus_ratio != 1.0:  # lora_B moves into a group of its own
        b_ids = {id(p) for n, p in peft_model.named_parameters() if ".lora_B." in n and p.requires_grad}
        group = opt.param_groups[0]
        b_params = [p for p in group["params"] if id(p) in b_ids]
        group["params"] = [p for p in group["params"] if id(p) not in b_ids]
        opt.add_param_group({"params": b_params, "lr": lr * lora_plus_ratio})
    return opt
