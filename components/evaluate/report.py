"""What a person looks at: grid.png (one row per sample: control | untrained | trained | reference), fidelity.png and
report.md."""
from __future__ import annotations

import io
import math

from PIL import Image

GRID_MAX_ROWS = 16  # a readable page; metrics always cover every sample


GRID_COLUMNS = "control | untrained | trained | reference"


def grid(rows: list[tuple[Image.Image, ...]], size: int) -> bytes:
    """PNG of len(rows) (at most GRID_MAX_ROWS) rows of size×size tiles (as many columns as the rows have), no gutters."""
    rows = rows[:GRID_MAX_ROWS]
    columns = max((len(r) for r in rows), default=0)
    canvas = Image.new("RGB", (columns * size, len(rows) * size), (255, 255, 255))
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
        f"![{GRID_COLUMNS}](grid.png)",
        "",
        f"*Rows: {GRID_COLUMNS} (first {min(summary['samples'], GRID_MAX_ROWS)} samples). Untrained: the ControlNet "
        "training started from (zero convolutions: the base alone), same control, prompt and seed.*",
        "",
        "## Metrics",
        "",
        "| metric | untrained ControlNet | trained ControlNet |",
        "|---|---|---|",
    ]
    before = summary.get("metrics_untrained") or {}
    lines += [f"| {name} | {_number(before.get(name))} | {_number(value)} |" for name, value in summary["metrics"].items()]
    if summary.get("fidelity_png"):
        lines += ["", f"![control fidelity, untrained vs trained]({summary['fidelity_png']})"]
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


def html_page(summary: dict, per_sample: list[dict], grid_png: bytes, training_records: list[dict],
              fidelity_png: bytes | None = None) -> str:
    """report.md as one self-contained page for the Kubeflow UI (its Markdown viewer cannot show grid.png from the
    bucket): the grid and the fidelity plot inlined, the metrics and yardsticks, the training curve as inline SVG,
    the prompts."""
    from components.report import html

    sections = [
        f"<p>ControlNet: <code>{html.esc(summary['controlnet'])}</code> · base: <code>{html.esc(summary['base_model'])}</code>"
        f" · control: <b>{html.esc(summary['control_type'])}</b> · {summary['resolution']} px, {summary['num_inference_steps']}"
        f" steps, guidance {summary['guidance_scale']}, seed {summary['seed']}</p>",
        f"<p>Samples: {summary['samples']} — {html.esc(summary['selection'])}</p>",
        html.figure(grid_png, GRID_COLUMNS, f"Rows: {GRID_COLUMNS} (first {min(summary['samples'], GRID_MAX_ROWS)} samples)."),
        "<h2>Metrics</h2>",
        html.table(["metric", "untrained ControlNet", "trained ControlNet"],
                   [[name, _number((summary.get("metrics_untrained") or {}).get(name)), _number(value)]
                    for name, value in summary["metrics"].items()], numeric={1, 2}),
    ]
    if fidelity_png:
        sections.append(html.figure(fidelity_png, "control fidelity, untrained vs trained"))
    table = summary.get("fidelity_yardsticks") or {}
    if table:
        sections += ["<h3>Control fidelity against its floor and ceiling</h3>", html.table(
            ["images", "precision", "recall", "F1"],
            [[label, _number(table[name]["precision"]), _number(table[name]["recall"]), _number(table[name]["f1"])]
             for name, label in YARDSTICKS.items() if name in table], numeric={1, 2, 3})]
    if summary["not_computed"]:
        sections += ["<p>Not computed:</p><ul>" + "".join(
            f"<li><b>{html.esc(name)}</b>: {html.esc(reason)}</li>" for name, reason in summary["not_computed"].items()) + "</ul>"]
    curve = html.training_curve(training_records)
    if curve:
        sections += ["<h2>Training</h2>", curve]
    sections += ["<h2>Metric definitions</h2><ul>" + "".join(f"<li>{html.esc(d)}</li>" for d in summary["definitions"]) + "</ul>"]
    columns = [k for k in per_sample[0] if k not in ("id", "prompt")] if per_sample else []
    sections += ["<h2>Prompts</h2>", html.table(
        ["#", "id", "prompt", *columns],
        [[i, row["id"], row["prompt"] or "(empty prompt)", *[_number(row[c]) for c in columns]] for i, row in enumerate(per_sample)],
        numeric=set(range(3, 3 + len(columns))))]
    return html.page("ControlNet evaluation", sections)


def write_html(output_uri: str, trained_uri: str, summary: dict, per_sample: list[dict], grid_png: bytes) -> None:
    """report.html beside report.md, with the training curve from the trained ControlNet's metrics.jsonl when there."""
    import json

    from cnpipe import storage

    metrics = storage.join(trained_uri, "metrics.jsonl")
    records = ([json.loads(line) for line in storage.read_bytes(metrics).decode().splitlines() if line.strip()]
               if storage.exists(metrics) else [])
    fidelity = storage.join(output_uri, summary["fidelity_png"]) if summary.get("fidelity_png") else None
    fidelity_png = storage.read_bytes(fidelity) if fidelity and storage.exists(fidelity) else None
    storage.write_bytes_atomic(storage.join(output_uri, "report.html"),
                               html_page(summary, per_sample, grid_png, records, fidelity_png).encode())


def write_html_from_outputs(output_uri: str, trained_uri: str) -> None:
    """report.html from what a finished evaluation left (metrics.json, grid.png): for one finished before report.html
    was written, which a rerun reuses instead of sampling again."""
    from cnpipe import storage

    saved = storage.read_json(storage.join(output_uri, "metrics.json"))
    per_sample = saved.pop("per_sample", [])
    write_html(output_uri, trained_uri, saved, per_sample, storage.read_bytes(storage.join(output_uri, "grid.png")))
