"""Pure math of the Riemannian (scaled) preconditioner of Zhang and Pilanci (2024).

For one LoRA pair (`B` `(out, r)`, `A` `(r, in)`) and their gradients, taken from the factors as they
are BEFORE the step:

    grad_A <- (B^T B + reg I)^-1 grad_A
    grad_B <- grad_B (A A^T + reg I)^-1

Both are `r x r` solves in fp32. The training optimizer comes from PEFT
(`peft.optimizers.create_riemannian_optimizer`, see `lora_one.core.optim`); this function is the dense
reference it is tested against and the one the toy experiments use.
"""

from __future__ import annotations

import torch

from lora_one.core.errors import UsageError


def precondition(
    A: torch.Tensor, B: torch.Tensor, grad_A: torch.Tensor, grad_B: torch.Tensor, reg: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the preconditioned `(grad_A, grad_B)`; raises if a solve is singular (never falls back)."""
    if reg < 0:
        raise UsageError(f"preconditioner damping reg must be >= 0, got {reg}.")
    r = A.shape[0]
    eye = torch.eye(r, dtype=torch.float32, device=A.device)
    Af, Bf = A.float(), B.float()
    gram_B = Bf.mT @ Bf + reg * eye
    gram_A = Af @ Af.mT + reg * eye
    new_grad_A = torch.linalg.solve(gram_B, grad_A.float())
    # X (A A^T + reg I) = grad_B  <=>  (A A^T + reg I) X^T = grad_B^T (the gram is symmetric)
    new_grad_B = torch.linalg.solve(gram_A, grad_B.float().mT).mT
    return new_grad_A.to(grad_A.dtype), new_grad_B.to(grad_B.dtype)
