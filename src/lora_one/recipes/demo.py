"""`lora-one demo`: LoRA vs LoRA-One vs LoRA-One + preconditioner on an embedded task, a preset of
`lora-one compare` (same data order and step budget; `report.md`, `comparison.png`, `summary.json` and
every adapter).

Each method's settings were picked by the sweep on the validation split recorded in docs/demo.md, so
the demo chooses nothing itself: it runs each method at its setting and reports the held-out test
split, which no choice here has seen.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from lora_one.core.errors import UsageError
from lora_one.recipes.compare import CompareSettings, run_compare


@dataclass
class Demo:
    model: str
    data: str
    val: str  # the split the settings were chosen on (docs/demo.md)
    test: str
    common: dict  # finetune settings shared by every method
    methods: dict[str, dict] = field(default_factory=dict)  # name -> settings of that method, lr included
    what: str = ""


SHARED = dict(rank=8, alpha=16.0, gamma=128.0, warmup_ratio=0.03, schedule="linear", max_length=128)
DEMOS = {
    "trec": Demo(
        model="smollm2-135m",
        data="trec",
        val="trec:val",
        test="trec:test",
        what="SmolLM2-135M-Instruct answering the TREC question type (6 classes) as one word",
        common=dict(SHARED, max_steps=40, batch_size=8, eval_every=20, init_samples=8, eval_batch_size=16),
        methods={
            "lora": {"lr": 5e-4},
            "lora-one": {"lr": 5e-4},
            "lora-one+precond": {"lr": 1e-3, "prec_reg": 1e-6},
        },
    ),
    "sentiment": Demo(
        model="minilm-l6",
        data="sentiment",
        val="sentiment:val",
        test="sentiment:test",
        what="all-MiniLM-L6-v2 classifying Rotten Tomatoes snippets as positive or negative",
        common=dict(SHARED, max_steps=100, batch_size=16, eval_every=50, init_samples=32, init_batch_size=8,
                    eval_batch_size=64, head_init="random"),
        methods={
            "lora": {"lr": 5e-4},
            "lora-one": {"lr": 5e-4},
            # not swept on this task: the TREC sweep's finding (twice LoRA-One's lr) carried over
            "lora-one+precond": {"lr": 1e-3, "prec_reg": 1e-6},
        },
    ),
}


def run_demo(task: str = "trec", out: str | Path | None = None, seed: int = 0, max_steps: int | None = None,
             methods: list[str] | None = None, quiet: bool = False, seeds: int = 1, overwrite: bool = False,
             **overrides) -> dict:
    """`run_compare` on the demo's task and methods at their settings; returns its summary."""
    demo = DEMOS[task]
    names = methods or list(demo.methods)
    unknown = [m for m in names if m not in demo.methods]
    if unknown:
        raise UsageError(f"Unknown demo method(s) {unknown}; choose from {list(demo.methods)}.")
    common = {**demo.common, **overrides}
    if max_steps:
        common.update(max_steps=max_steps, eval_every=max(1, max_steps // 2))
    settings = CompareSettings(model=demo.model, data=demo.data, eval_data=demo.val, test_data=demo.test,
                               out=str(out or ("runs/demo" if task == "trec" else f"runs/demo-{task}")), seed=seed,
                               seeds=seeds, quiet=quiet, overwrite=overwrite, **common)
    return run_compare(settings, {name: demo.methods[name] for name in names}, what=demo.what)
