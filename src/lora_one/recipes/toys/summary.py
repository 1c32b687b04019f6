"""`summary.md` of `lora-one toy all`: one claims table with the numbers, then every figure."""

from __future__ import annotations

import json
from pathlib import Path

from lora_one.recipes.toys.report import Report


def _cell(text: str) -> str:
    """Text for a Markdown table cell: a `|` would end the cell."""
    return text.replace("|", "\\|")


def _brief(evidence: dict, limit: int = 220) -> str:
    text = json.dumps(evidence, default=str)
    return _cell(text if len(text) <= limit else text[: limit - 3] + "...")


def write_summary(root: Path, reports: list[Report]) -> Path:
    claims = [(r, c) for r in reports for c in r.claims]
    held = sum(c.holds for _, c in claims)
    lines = [
        "# LoRA-One theory toys",
        "",
        f"{held} of {len(claims)} claims hold. Each experiment's `results.json` has the full numbers.",
        "",
        "| experiment | claim | holds | statement | evidence |",
        "|---|---|---|---|---|",
    ]
    for report, c in claims:
        lines.append(
            f"| {report.experiment} | `{c.name}` | {'yes' if c.holds else '**NO**'} | "
            f"{_cell(c.statement)} | `{_brief(c.evidence)}` |"
        )
    lines += ["", "| experiment | seconds | quick |", "|---|---|---|"]
    lines += [f"| {r.experiment} | {r.seconds:.1f} | {r.config.get('quick')} |" for r in reports]
    for report in reports:
        lines += ["", f"## {report.experiment}: {report.title}", ""]
        lines += [f"![{report.experiment}]({report.experiment}/{name})" for name in report.figures]
        lines += [f"- {note}" for note in report.notes]
    path = root / "summary.md"
    root.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path
