"""The two figures: a run's `loss.png` and a comparison's `comparison.png` (matplotlib, no display)."""

from __future__ import annotations

import math
import re
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter, Locator, LogLocator, MaxNLocator, NullFormatter  # noqa: E402

from lora_one.core.files import replacing  # noqa: E402


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


class LossTicks(Locator):
    """The labelled ticks of a log-scale loss axis, few and apart whatever its span: evenly spaced round
    numbers over up to a decade (where a log axis is nearly linear), 1, 2 and 5 of each decade over up
    to four, powers of 10 beyond."""

    def __call__(self):
        return self.tick_values(*self.axis.get_view_interval())

    def tick_values(self, vmin, vmax):
        vmin, vmax = sorted((vmin, vmax))
        decades = math.log10(vmax / vmin) if vmin > 0 else math.inf
        if decades <= 1:
            return [t for t in MaxNLocator(nbins=4).tick_values(vmin, vmax) if t > 0]
        return LogLocator(subs=(1.0, 2.0, 5.0) if decades <= 4 else (1.0,)).tick_values(vmin, vmax)


def short_title(title: str) -> str:
    """`title` with each word that names an existing file or folder by a path (`runs/data/train.jsonl`,
    `/models/smollm2`) shortened to that file's stem or that folder's name; other words as they are."""
    def short(match: re.Match) -> str:
        word = match.group()
        path = Path(word)
        if "/" not in word or not path.exists():
            return word
        return (path.stem if path.is_file() else path.resolve().name) or word

    return re.sub(r"[^\s,;()]+", short, title)


def plot_comparison(curves: dict[str, dict[str, list[dict]]], path: str | Path, metric: str | None = "accuracy",
                    title: str = "", split: str = "held-out") -> Path:
    """Loss and `metric` (None: loss only) against step, one line per method, written to `path`
    (`comparison_figure`)."""
    _save(comparison_figure(curves, metric, title, split), path)
    return Path(path)


def comparison_figure(curves: dict[str, dict[str, list[dict]]], metric: str | None = "accuracy", title: str = "",
                      split: str = "held-out"):
    """The figure of `plot_comparison`: `curves[method][key]` is a list of points `{"step", "mean",
    "se"}`, drawn as the mean with a band of one standard error (where there is one: several seeds).
    The loss axis is logarithmic with plain labels (`LossTicks`); the title names files by their stems
    (`short_title`), wrapped to the figure's width."""
    keys = ["loss", *([metric] if metric else [])]
    width = 5.5 * len(keys)
    fig, axes = plt.subplots(1, len(keys), figsize=(width, 4), squeeze=False)
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
        if key == "loss":  # plain numbers on the log axis, not 3.5 x 10^0; unlabelled minor ticks
            ax.yaxis.set_major_locator(LossTicks())
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(NullFormatter())
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(textwrap.fill(short_title(title), int(11 * width)))
    fig.tight_layout()
    return fig
