"""The training optimizer: AdamW, or AdamW behind PEFT's Riemannian preconditioner."""

from __future__ import annotations

import torch
from peft.optimizers import create_riemannian_optimizer
from torch import nn

from lora_one.core.errors import UsageError

# The authors' damping is 1e-6, PEFT's 1e-2; ours was chosen by the quality benchmark's levers (docs/benchmark.md).
DEFAULT_REG = 1e-4


def create_optimizer(
    peft_model: nn.Module,
    lr: float,
    precondition: bool = False,
    reg: float = DEFAULT_REG,
    weight_decay: float = 0.0,
    lora_plus_ratio: float = 1.0,
    **adamw_kwargs,
) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; with `precondition=True`, each LoRA pair's gradients are
    first multiplied by `(B^T B + reg I)^-1` (for A) and `(A A^T + reg I)^-1` (for B).

    `weight_decay` defaults to 0, as in the authors' recipe and `lora-one finetune` (torch's AdamW
    would decay by 0.01); other `adamw_kwargs` (betas, eps, ...) go to AdamW as they are.

    The preconditioner is PEFT's `create_riemannian_optimizer`, which pairs `lora_A`/`lora_B` by name,
    computes the `r x r` inverses in fp32 from the factors before the step and never falls back to
    plain AdamW. It inverts with `pinv`, which equals the spec's solve whenever `B^T B + reg I` is
    well conditioned (tested against `lora_one.linalg.preconditioner.precondition`).

    `lora_plus_ratio` (LoRA+): the `lora_B` factors learn at `ratio * lr`.
    """
    if not lr > 0:
        raise UsageError(f"learning rate must be positive, got {lr}.")
    if not reg >= 0:
        raise UsageError(f"preconditioner damping reg must be >= 0, got {reg}.")
    if not lora_plus_ratio > 0:
        raise UsageError(f"lora_plus_ratio must be > 0, got {lora_plus_ratio}.")
    if precondition:
        opt = create_riemannian_optimizer(peft_model, torch.optim.AdamW, lr=lr, reg=reg, weight_decay=weight_decay,
                                          **adamw_kwargs)
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
