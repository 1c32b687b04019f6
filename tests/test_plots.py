"""`comparison.png` (issue 23): the title names files by their stems, and the log-scale loss axis has
plain labels that never overlap, whatever the span, checked on the drawn figure's own text boxes."""

from __future__ import annotations

import math

import pytest

from lora_one.recipes.plots import comparison_figure, plot_comparison, short_title


def curve(first: float, last: float, steps=(0, 25, 50, 75, 100)) -> list[dict]:
    """A geometric decay from `first` to `last`, with a standard-error band of 5%."""
    points = []
    for i, step in enumerate(steps):
        mean = first * (last / first) ** (i / (len(steps) - 1))
        points.append({"step": step, "mean": mean, "se": 0.05 * mean})
    return points


def test_the_title_names_files_by_their_stems(tmp_path):
    model = tmp_path / "models" / "smollm2-135m-instruct"
    model.mkdir(parents=True)
    data = tmp_path / "data" / "my_train_set.jsonl"
    data.parent.mkdir()
    data.write_text("{}\n")
    title = f"{model} fine-tuned on {data} (test split, mean ± standard error over 3 seeds)"
    fig = comparison_figure({"lora": {"loss": curve(2.4, 0.1)}}, None, title)
    assert fig._suptitle.get_text().replace("\n", " ") == (
        "smollm2-135m-instruct fine-tuned on my_train_set (test split, mean ± standard error over 3 seeds)")
    # words that are no file stay: a Hub id, an embedded set, a slash in prose
    assert short_title("HuggingFaceTB/SmolLM2-135M on trec:train, loss/accuracy") == (
        "HuggingFaceTB/SmolLM2-135M on trec:train, loss/accuracy")
    path = plot_comparison({"lora": {"loss": curve(2.4, 0.1)}}, tmp_path / "comparison.png", None, title)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("first, last", [(2.4, 0.025), (0.09, 0.03), (2.45, 2.31), (30.0, 1e-4)])
def test_loss_axis_labels_are_plain_few_and_apart(first, last):
    curves = {"lora": {"loss": curve(first, last)}, "lora-one": {"loss": curve(first, last * 0.8)}}
    fig = comparison_figure(curves, None, "a title")
    fig.canvas.draw()
    ax = fig.axes[0]
    assert ax.get_yscale() == "log"
    assert not [t.get_text() for t in ax.yaxis.get_minorticklabels() if t.get_text()]
    low, high = ax.get_ylim()
    labels = [t for t in ax.yaxis.get_majorticklabels() if t.get_visible() and t.get_text()
              and low <= t.get_position()[1] <= high]
    assert 2 <= len(labels) <= 8, [t.get_text() for t in labels]
    for t in labels:  # plain numbers, each the value of its tick
        assert math.isclose(float(t.get_text()), t.get_position()[1], rel_tol=1e-6)
    boxes = sorted((t.get_window_extent() for t in labels), key=lambda b: b.y0)
    gaps = [b.y0 - a.y1 for a, b in zip(boxes, boxes[1:])]
    assert min(gaps) > 0, [t.get_text() for t in labels]
