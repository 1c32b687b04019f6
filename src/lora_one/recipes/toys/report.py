"""What a toy experiment hands back: claims with their evidence, plotted numbers, figures, `results.json`."""

from __future__ import annotations

import json
import math
import textwrap
from dataclasses import asdict, dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


@dataclass
class Claim:
    """One statement of the paper, checked: `holds` is a plain boolean, `evidence` the numbers behind it."""

    name: str
    statement: str
    holds: bool
    evidence: dict

    def __post_init__(self) -> None:
        self.holds = bool(self.holds)


@dataclass
class Report:
    experiment: str
    title: str
    config: dict
    data: dict = field(default_factory=dict)
    claims: list[Claim] = field(default_factory=list)
    figures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def claim(self, name: str, statement: str, holds: bool, **evidence) -> None:
        self.claims.append(Claim(name, statement, holds, evidence))

    def to_json(self) -> dict:
        body = asdict(self)
        body["all_claims_hold"] = all(c.holds for c in self.claims)
        return _finite(body)

    def write(self, out: Path) -> Path:
        out.mkdir(parents=True, exist_ok=True)
        path = out / "results.json"
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        return path


def _finite(value):
    """JSON has no inf / nan: write them as strings so that the file stays standard JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def figure(ncols: int = 1, width: float = 6.0, height: float = 4.2, **kwargs):
    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, height), squeeze=False, **kwargs)
    return fig, list(axes[0])


def label(ax, title: str, xlabel: str, ylabel: str, logy: bool = False, logx: bool = False) -> None:
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
    if logx:
        ax.set_xscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")


def save(fig, report: Report, out: Path, name: str, suptitle: str | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if suptitle:  # wrapped to the figure's width (about 11 characters an inch at the default size)
        fig.suptitle(textwrap.fill(suptitle, int(fig.get_figwidth() * 11)))
    fig.tight_layout()
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    report.figures.append(name)


def optimiser_panels(
    panels: dict[str, tuple[float, float | None, dict[str, list[float]]]],
    target: float,
    target_label: str,
    ylabel: str,
):
    """One log-scale panel per optimiser (`title -> (lr, reg or None, {curve label: values})`), each
    with a dotted line at `target`; returns the figure for `save`."""
    fig, axes = figure(len(panels), sharey=True)
    for ax, (name, (lr, reg, curves)) in zip(axes, panels.items()):
        for curve, values in curves.items():
            ax.plot(positive(values), label=curve)
        ax.axhline(target, color="gray", ls=":", label=target_label)
        title = f"{name} (step {lr:g}{'' if reg is None else f', lambda {reg:g}'})"
        label(ax, title, "step t", ylabel, logy=True)
    bottom, top = axes[0].get_ylim()
    axes[0].set_ylim(max(bottom, 1e-16), top)  # below float64 round-off the curves say nothing
    return fig


def positive(values):
    """Values for a log axis: non-positive ones (exact zeros) become None, which matplotlib skips."""
    return [v if v > 0 else float("nan") for v in values]
