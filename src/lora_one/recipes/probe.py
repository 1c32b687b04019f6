"""Fit a fresh classification head on frozen features (a linear probe) before the LoRA-One init.

With a randomly initialised head, the one-step gradient of the encoder weights is the encoder's
response to a random readout, mostly a random projection; through a fitted head it points where the
task needs the features to move. The probe is multinomial logistic regression with a small L2
penalty, solved by full-batch L-BFGS on the head's inputs (the pooled features), which takes seconds.
"""

from __future__ import annotations

import random

import torch
from torch import nn

from lora_one.core.errors import UsageError
from lora_one.recipes.data import collate

HEAD_NAMES = ("classifier", "score")


def classification_head(model: nn.Module) -> nn.Linear:
    for name in HEAD_NAMES:
        head = getattr(model, name, None)
        if isinstance(head, nn.Linear):
            return head
    raise UsageError(
        f"{type(model).__name__} has no single nn.Linear head named {' or '.join(HEAD_NAMES)}; "
        "use --head-init random for this model."
    )


@torch.no_grad()
def head_inputs(model: nn.Module, features: list[dict], pad_id: int, batch_size: int = 64) -> torch.Tensor:
    """The inputs the head sees (in eval mode), one row per example."""
    head = classification_head(model)
    rows = []
    handle = head.register_forward_hook(lambda mod, inp, out: rows.append(inp[0].detach().float().cpu()))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(features)), key=lambda i: len(features[i]["input_ids"]))  # less padding
    try:
        for start in range(0, len(order), batch_size):
            batch = collate([features[i] for i in order[start : start + batch_size]], pad_id)
            model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
    finally:
        handle.remove()
        model.train(was_training)
    X = torch.empty(len(features), rows[0].shape[1])
    X[order] = torch.cat(rows)
    return X


def fit_logistic(X: torch.Tensor, y: torch.Tensor, n_classes: int, l2: float = 1e-3, iters: int = 200):
    """`(W (k, d), b (k,))` minimising mean cross-entropy + `l2/2 ||W||^2`, by L-BFGS from zero."""
    W = torch.zeros(n_classes, X.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    X, y = X.double(), y.long()
    opt = torch.optim.LBFGS([W, b], lr=1.0, max_iter=iters, tolerance_grad=1e-9, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(X @ W.T + b, y) + 0.5 * l2 * (W * W).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return W.detach(), b.detach()


def probe_head(model: nn.Module, features: list[dict], pad_id: int, n_samples: int, seed: int,
               l2: float = 1e-3) -> dict:
    """Fit `model`'s head on up to `n_samples` training examples; returns what to record."""
    head = classification_head(model)
    idx = random.Random(seed).sample(range(len(features)), min(n_samples, len(features)))
    chosen = [features[i] for i in idx]
    X = head_inputs(model, chosen, pad_id)
    y = torch.tensor([f["labels"] for f in chosen])
    W, b = fit_logistic(X, y, head.out_features, l2)
    with torch.no_grad():
        head.weight.copy_(W.to(head.weight.dtype))
        if head.bias is not None:
            head.bias.copy_(b.to(head.bias.dtype))
    train_acc = float(((X.double() @ W.T + b).argmax(1) == y).double().mean())
    return {"probe_samples": len(chosen), "probe_l2": l2, "probe_train_accuracy": round(train_acc, 4)}
