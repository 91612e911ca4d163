"""Convergence benchmark on the fill domain (issue 15, item 3): time-to-target of our trainer vs diffusers' PyTorch step.

Both sides train the `embedded-fill` preset's ControlNet (its base, batch 16, lr 5e-4, 50 warm-up steps then
constant, AdamW, grad-norm clipping 1.0, no EMA) from the same initial weights (the Flax init that our stage makes,
ControlNetModel.from_unet's layout, zero convs zero, exported to PyTorch names for the other side), on the same
encode-stage rows in the same order (BatchFeed, the trainer's own feed). Our side is the real stage
(components.controlnet_train.stage.run: data feed, jitted step, logging, orbax checkpoints, export; XLA:CPU's thread
pool sizes itself to the cores). The PyTorch side is train_controlnet.py's step (bench/diffusers_reference.py: fp32,
torch.set_num_threads(cores), no accelerate). train_controlnet.py encodes every batch's images with the VAE at each
step; here both sides are fed the same cached latents (and text encodings) from the encode stage, so the VAE and
text encoder cost neither side anything.

Every --every steps (and at step 0, once: both sides start from the same weights) the ControlNet is scored on the
preset's held-out controls with evaluate's own sampler (components.evaluate.generate: the PyTorch
StableDiffusionControlNetPipeline, 8 samples, 20 steps, guidance 3.0, the same seeds): evaluate's edge F1 of the
generated image against its control, and the IoU and centre error of circles fitted to both. Time-to-target (MLPerf
style): training wall time (loading and JAX compile included, scoring excluded and reported apart) until the first
scored checkpoint whose edge F1 >= max(0.5, 3 x the untrained one's). A side stops at its target, at --max-steps,
or when --budget-s (the whole bench) would run out; a side that stops short reports a lower bound.

    .venvs/train/bin/python bench/convergence.py [RUN]       # RUN: an embedded-fill run folder (default
                                                            # runs/convergence-data, made when absent)
    .venvs/vision/bin/python bench/convergence.py --grid RUN # only score RUN's evaluate grid (untrained vs trained;
                                                            # OpenCV, so evaluate's environment)

Writes bench/results/convergence.json and bench/results/convergence.png (held-out edge F1 vs training seconds).
"""
from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys

import numpy as np
from PIL import Image

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

COLUMNS = ("control", "untrained", "trained", "reference")
RESULTS = REPO / "bench" / "results"
TARGET_FLOOR, TARGET_FACTOR = 0.5, 3.0


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


def mean_scores(scores: list[dict]) -> dict:
    return {k: round(float(np.mean([s[k] for s in scores])), 4) for k in scores[0]}


def score_grid(grid_png: pathlib.Path, size: int, low: int, high: int) -> dict:
    """Mean scores of the untrained and trained columns of evaluate's grid (and the reference, as the ceiling)."""
    grid = Image.open(grid_png).convert("RGB")
    rows = grid.size[1] // size
    tiles = lambda r, c: grid.crop((c * size, r * size, (c + 1) * size, (r + 1) * size))  # noqa: E731
    result = {}
    for column in ("untrained", "trained", "reference"):
        c = COLUMNS.index(column)
        result[column] = mean_scores([score(tiles(r, 0), tiles(r, c), low, high) for r in range(rows)])
    result["rows"] = rows
    return result


def target_f1(untrained_f1: float) -> float:
    """The issue's target: trained edge F1 at least 3x the untrained one's and at least 0.5."""
    return max(TARGET_FLOOR, TARGET_FACTOR * untrained_f1)


def time_to_target(curve: list[dict], target: float) -> float | None:
    """Training seconds of the first checkpoint whose edge F1 reaches `target` (None: never reached)."""
    for point in curve:
        if point["edge_f1"] >= target:
            return point["train_s"]
    return None


def fill_config():
    import pipeline_configs

    return pipeline_configs.preset("embedded-fill")


def grid_main(run: pathlib.Path) -> None:
    config = fill_config()
    metrics = json.loads((run / "evaluate" / "metrics.json").read_text())
    scores = score_grid(run / "evaluate" / "grid.png", metrics["resolution"], config.conditioning.canny_low,
                        config.conditioning.canny_high)
    print(json.dumps({"evaluate_edge_f1": {"untrained": metrics["metrics_untrained"].get("canny_f1"),
                                           "trained": metrics["metrics"].get("canny_f1")}, **scores}, indent=1))


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", nargs="?", default=str(REPO / "runs" / "convergence-data"),
                        help="an embedded-fill run folder with encode/ and conditioning/ (made when absent)")
    parser.add_argument("--grid", action="store_true", help="only score the run's evaluate grid")
    parser.add_argument("--every", type=int, default=150, help="score every this many steps")
    parser.add_argument("--max-steps", type=int, default=1500, help="each side's step cap")
    parser.add_argument("--budget-s", type=float, default=1140.0, help="the whole bench's wall-time budget")
    parser.add_argument("--sides", default="ours,pytorch")
    parser.add_argument("--out", default=str(RESULTS / "convergence.json"))
    args = parser.parse_args(argv)
    if args.grid:
        grid_main(pathlib.Path(args.run))
        return
    from convergence_run import run_benchmark  # the heavy part: JAX, torch and diffusers

    run_benchmark(args)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO / "bench"))
    main(sys.argv[1:])
