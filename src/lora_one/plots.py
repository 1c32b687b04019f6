"""The two figures: a run's `loss.png` and the demo's `comparison.png` (matplotlib, no display)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from lora_one.files import replacing  # noqa: E402


def _series(metrics: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(m["step"], m[key]) for m in metrics if key in m]
    return [p[0] for p in points], [p[1] for p in points]


def _save(fig, path: str | Path) -> None:
    try:
        with replacing(path) as tmp:  # atomic: a crash never leaves half a PNG
            fig.savefig(tmp, dpi=120)
    finally:
        plt.close(fig)


def plot_loss(metrics: list[dict], path: str | Path, title: str = "") -> Path:
    """Train loss per step and eval loss at each eval, against step."""
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(*_series(metrics, "train_loss"), lw=1, alpha=0.8, label="train loss")
    steps, losses = _series(metrics, "eval_loss")
    if steps:
        ax.plot(steps, losses, "o-", label="eval loss")
    ax.set(xlabel="step", ylabel="loss", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    _save(fig, path)
    return Path(path)


def plot_comparison(runs: dict[str, list[dict]], path: str | Path, metric: str = "accuracy", title: str = "") -> Path:
    """Held-out loss and `metric` against step, one line per run."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, metrics in runs.items():
        for ax, key in zip(axes, ("eval_loss", f"eval_{metric}")):
            ax.plot(*_series(metrics, key), "o-", label=name)
    axes[0].set(xlabel="step", ylabel="held-out loss", yscale="log")
    axes[1].set(xlabel="step", ylabel=f"held-out {metric}")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    _save(fig, path)
    return Path(path)
