"""What a person looks at: grid.png (one row per sample: control | generated | reference) and report.md."""
from __future__ import annotations

import io
import math

from PIL import Image

GRID_MAX_ROWS = 16  # a readable page; metrics always cover every sample


def grid(rows: list[tuple[Image.Image, Image.Image, Image.Image]], size: int) -> bytes:
    """PNG of len(rows) (at most GRID_MAX_ROWS) rows of three size×size tiles, no gutters."""
    rows = rows[:GRID_MAX_ROWS]
    canvas = Image.new("RGB", (3 * size, len(rows) * size), (255, 255, 255))
    for r, tiles in enumerate(rows):
        for c, tile in enumerate(tiles):
            canvas.paste(tile.convert("RGB").resize((size, size)), (c * size, r * size))
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    return buffer.getvalue()


def _number(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ") or "*(empty prompt)*"


YARDSTICKS = {  # what each row of the control-fidelity table is, on the same controls
    "generated": "generated images",
    "reference": "reference images (the ceiling)",
    "noise": "uniform noise images (the floor)",
    "all_edges": "every pixel an edge (the floor)",
}


def _yardsticks(table: dict) -> list[str]:
    """Control fidelity of the generated images between its floor and ceiling: a score near the noise row means
    the ControlNet does not follow its controls."""
    if not table:
        return []
    lines = ["", "### Control fidelity against its floor and ceiling", "", "| images | precision | recall | F1 |", "|---|---|---|---|"]
    for name, label in YARDSTICKS.items():
        if name in table:
            row = table[name]
            lines.append(f"| {label} | {_number(row['precision'])} | {_number(row['recall'])} | {_number(row['f1'])} |")
    return lines


def markdown(summary: dict, per_sample: list[dict]) -> str:
    lines = [
        "# ControlNet evaluation",
        "",
        f"ControlNet: `{summary['controlnet']}` · base: `{summary['base_model']}` · control: **{summary['control_type']}** · "
        f"{summary['resolution']} px, {summary['num_inference_steps']} steps, guidance {summary['guidance_scale']}, seed {summary['seed']}",
        "",
        f"Samples: {summary['samples']} — {summary['selection']}",
        "",
        "![control | generated | reference](grid.png)",
        "",
        f"*Rows: control | generated | reference (first {min(summary['samples'], GRID_MAX_ROWS)} samples).*",
        "",
        "## Metrics",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    lines += [f"| {name} | {_number(value)} |" for name, value in summary["metrics"].items()]
    lines += _yardsticks(summary.get("fidelity_yardsticks") or {})
    if summary["not_computed"]:
        lines += ["", "Not computed:", ""]
        lines += [f"- **{name}**: {reason}" for name, reason in summary["not_computed"].items()]
    lines += ["", "## Metric definitions", ""] + [f"- {d}" for d in summary["definitions"]]
    columns = [k for k in per_sample[0] if k not in ("id", "prompt")] if per_sample else []
    lines += ["", "## Prompts", "", "| # | id | prompt | " + " | ".join(columns) + " |", "|---" * (3 + len(columns)) + "|"]
    for i, row in enumerate(per_sample):
        lines.append(f"| {i} | {row['id']} | {_cell(row['prompt'])} | " + " | ".join(_number(row[c]) for c in columns) + " |")
    return "\n".join(lines) + "\n"
