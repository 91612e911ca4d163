"""Convergence benchmark for the fill domain (issue 15, item 3), first part: control fidelity of generated circles.

Why: edge F1 alone says whether edges land near the control's; on the fill domain we can also say whether the
generated circle is the control's circle. A circle is fitted to the control's outline (least squares on its edge
pixels) and to the generated image (the pixels that differ from the border colour: centroid and area), and we
report edge F1 (evaluate's own metric), circle IoU and centre error in pixels.

Today it scores an `embedded-fill` run's evaluate grid (columns control | untrained | trained | reference), i.e.
step 0 (the zero-initialised ControlNet) against the final step on the same held-out controls and seeds:

    python bench/convergence.py runs/<run-id>

Left to do: scoring intermediate checkpoints of our trainer, and the same for diffusers' train_controlnet.py, with
time-to-target and a plot.
"""
from __future__ import annotations

import json
import math
import pathlib
import sys

import numpy as np
from PIL import Image

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

COLUMNS = ("control", "untrained", "trained", "reference")


def fit_outline(control: Image.Image) -> tuple[float, float, float] | None:
    """(cx, cy, r) least-squares (Kasa) circle through the control's edge pixels; None with too few of them."""
    mask = np.asarray(control.convert("L")) > 127
    ys, xs = np.nonzero(mask)
    if len(xs) < 8:
        return None
    x, y = xs + 0.5, ys + 0.5
    a = np.stack([x, y, np.ones_like(x)], axis=1)
    (d, e, f), *_ = np.linalg.lstsq(a, x * x + y * y, rcond=None)
    cx, cy = d / 2, e / 2
    return float(cx), float(cy), float(math.sqrt(max(f + cx * cx + cy * cy, 0.0)))


def fit_filled(image: Image.Image, threshold: int = 60) -> tuple[float, float, float] | None:
    """(cx, cy, r) of the region that differs from the border's median colour: centroid and area; None if empty."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.int16)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    inside = np.abs(pixels - np.median(border, axis=0)).sum(axis=2) > threshold
    ys, xs = np.nonzero(inside)
    if len(xs) == 0:
        return None
    return float(xs.mean()) + 0.5, float(ys.mean()) + 0.5, math.sqrt(len(xs) / math.pi)


def circle_iou(a, b, size: int, supersample: int = 4) -> float:
    """IoU of two discs rasterised on a size×size image at `supersample`× resolution."""
    grid = (np.arange(size * supersample) + 0.5) / supersample
    x, y = np.meshgrid(grid, grid)
    da = np.hypot(x - a[0], y - a[1]) <= a[2]
    db = np.hypot(x - b[0], y - b[1]) <= b[2]
    union = np.logical_or(da, db).sum()
    return float(np.logical_and(da, db).sum() / union) if union else 0.0


def score(control: Image.Image, generated: Image.Image, low: int, high: int) -> dict:
    """Edge F1 (evaluate's canny fidelity), circle IoU and centre error (px; the image diagonal when no circle)."""
    from components.evaluate.fidelity import canny_fidelity

    size = control.size[0]
    out = {"edge_f1": canny_fidelity(generated, control, low, high)["f1"]}
    target, found = fit_outline(control), fit_filled(generated)
    if target is None or found is None:
        out.update(iou=0.0, centre_error=math.hypot(size, size))
    else:
        out.update(iou=circle_iou(target, found, size), centre_error=math.hypot(target[0] - found[0], target[1] - found[1]))
    return out


def score_grid(grid_png: pathlib.Path, size: int, low: int, high: int) -> dict:
    """Mean scores of the untrained and trained columns of evaluate's grid (and the reference, as the ceiling)."""
    grid = Image.open(grid_png).convert("RGB")
    rows = grid.size[1] // size
    tiles = lambda r, c: grid.crop((c * size, r * size, (c + 1) * size, (r + 1) * size))
    result = {}
    for column in ("untrained", "trained", "reference"):
        c = COLUMNS.index(column)
        scores = [score(tiles(r, 0), tiles(r, c), low, high) for r in range(rows)]
        result[column] = {k: round(float(np.mean([s[k] for s in scores])), 4) for k in scores[0]}
    result["rows"] = rows
    return result


def main(argv: list[str]) -> None:
    import pipeline_configs

    run = pathlib.Path(argv[0])
    config = pipeline_configs.preset("embedded-fill")
    metrics = json.loads((run / "evaluate" / "metrics.json").read_text())
    scores = score_grid(run / "evaluate" / "grid.png", metrics["resolution"], config.conditioning.canny_low,
                        config.conditioning.canny_high)
    print(json.dumps({"evaluate_edge_f1": {"untrained": metrics["metrics_untrained"].get("canny_f1"),
                                           "trained": metrics["metrics"].get("canny_f1")}, **scores}, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
