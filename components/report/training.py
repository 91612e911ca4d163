"""The run report's "How much training helped" section: the loss curve from controlnet_train's metrics.jsonl and
evaluate's fidelity numbers, untrained beside trained, as PNG plots written beside report.md, and evaluate's grid
(control | untrained | trained | reference) copied there so report.md shows it."""
from __future__ import annotations

import json

from cnpipe import storage
from cnpipe.dataset import StageOutput
from components.report import plots

LOSS_PNG, FIDELITY_PNG, GRID_PNG = "loss_curve.png", "fidelity.png", "evaluation_grid.png"


def _number(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else "–" if value is None else str(value)


def section(inputs: dict, output_uri: str) -> list[str]:
    """Markdown lines (empty when neither training nor evaluation is among the inputs); writes the PNGs it links."""
    lines: list[str] = []
    train = inputs.get("controlnet_train")
    if isinstance(train, StageOutput):
        uri = storage.join(train.uri, "metrics.jsonl")
        records = ([json.loads(line) for line in storage.read_bytes(uri).decode().splitlines() if line.strip()]
                   if storage.exists(uri) else [])
        curve = plots.loss_curve(records)
        losses = [r["loss"] for r in records if isinstance(r.get("loss"), (int, float))]
        if curve:
            storage.write_bytes_atomic(storage.join(output_uri, LOSS_PNG), curve)
            lines += ["", "## Training", "", f"![training loss]({LOSS_PNG})", "",
                      f"Loss over {len(losses)} logged steps: first {losses[0]:.4g}, last {losses[-1]:.4g}, "
                      f"lowest {min(losses):.4g} (`{uri}`)."]
    evaluated = inputs.get("evaluate")
    if isinstance(evaluated, StageOutput):
        summary = evaluated.summary
        trained, untrained = summary.get("metrics") or {}, summary.get("metrics_untrained") or {}
        lines += ["", "## How much training helped", ""]
        grid = storage.join(evaluated.uri, "grid.png")
        if storage.exists(grid):
            storage.write_bytes_atomic(storage.join(output_uri, GRID_PNG), storage.read_bytes(grid))
            lines += [f"![control | untrained | trained | reference]({GRID_PNG})", "",
                      "*Rows: control | untrained ControlNet (the base alone) | trained ControlNet | reference, held-out "
                      "controls, the same prompt and seed in each row.*", ""]
        bars = plots.fidelity_bars(summary)
        if bars:
            storage.write_bytes_atomic(storage.join(output_uri, FIDELITY_PNG), bars)
            lines += [f"![control fidelity]({FIDELITY_PNG})", ""]
        if trained:
            lines += ["| metric | untrained ControlNet | trained ControlNet |", "|---|---:|---:|"]
            lines += [f"| {k} | {_number(untrained.get(k))} | {_number(v)} |" for k, v in trained.items()]
    return lines
