"""The two figures: a run's `loss.png` and a comparison's `comparison.png` (matplotlib, no display)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter, MaxNLocator  # noqa: E402

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


def plot_comparison(curves: dict[str, dict[str, list[dict]]], path: str | Path, metric: str | None = "accuracy",
                    title: str = "", split: str = "held-out") -> Path:
    """Loss and `metric` (None: loss only) against step, one line per method: `curves[method][key]` is a
    list of points `{"step", "mean", "se"}`, drawn as the mean with a band of one standard error (where
    there is one: several seeds)."""
    keys = ["loss", *([metric] if metric else [])]
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    fig, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 4), squeeze=False)
    for name, curve in curves.items():
        for ax, key in zip(axes[0], keys):
            points = curve[key]
            steps, mean = [p["step"] for p in points], [p["mean"] for p in points]
            (line,) = ax.plot(steps, mean, "o-", label=name)
            if all(p["se"] is not None for p in points):
                ax.fill_between(steps, [m - p["se"] for m, p in zip(mean, points)],
                                [m + p["se"] for m, p in zip(mean, points)], color=line.get_color(), alpha=0.2)
    for ax, key in zip(axes[0], keys):
        ax.set(xlabel="step", ylabel=f"{split} {key.replace('_', ' ')}", yscale="log" if key == "loss" else "linear")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if key == "loss":  # plain numbers on the log axis, not 3.5 x 10^0
            ax.yaxis.set_major_formatter(plain)
            ax.yaxis.set_minor_formatter(plain)
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    _save(fig, path)
    return Path(path)
