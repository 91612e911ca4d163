"""PNG plots drawn with PIL (matplotlib is in none of the families' environments): the training loss curve and the
control-fidelity bars (untrained | trained beside the floor and ceiling). Pure functions of their numbers."""
from __future__ import annotations

import io
import math

from PIL import Image, ImageDraw, ImageFont

WIDTH, HEIGHT = 640, 360
MARGIN_L, MARGIN_R, MARGIN_T, MARGIN_B = 64, 16, 32, 44
COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / count
    step = 10 ** math.floor(math.log10(raw))
    step *= next(m for m in (1, 2, 2.5, 5, 10) if m * step >= raw)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step) + 1)]


def _label(value: float) -> str:
    return f"{value:.3g}"


def line_plot(series: dict[str, list[tuple[float, float]]], title: str, xlabel: str, ylabel: str) -> bytes:
    """One line per named series of (x, y) points, on shared linear axes with ticks; a legend top right."""
    font = ImageFont.load_default()
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    points = [p for pts in series.values() for p in pts if all(math.isfinite(v) for v in p)]
    x0, y0, x1, y1 = MARGIN_L, MARGIN_T, WIDTH - MARGIN_R, HEIGHT - MARGIN_B
    draw.text((x0, 8), title, fill="black", font=font)
    draw.rectangle([x0, y0, x1, y1], outline=(120, 120, 120))
    if not points:
        draw.text((x0 + 10, y0 + 10), "no data", fill="black", font=font)
        return _png(image)
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    xlo, xhi = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    ylo, yhi = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1
    pad = 0.05 * (yhi - ylo)
    ylo, yhi = ylo - pad, yhi + pad

    def at(x: float, y: float) -> tuple[float, float]:
        return x0 + (x - xlo) / (xhi - xlo) * (x1 - x0), y1 - (y - ylo) / (yhi - ylo) * (y1 - y0)

    for t in _ticks(ylo, yhi):
        _, y = at(xlo, t)
        draw.line([x0, y, x1, y], fill=(230, 230, 230))
        draw.text((4, y - 6), _label(t), fill="black", font=font)
    for t in _ticks(xlo, xhi):
        x, _ = at(t, ylo)
        draw.line([x, y1, x, y1 + 4], fill="black")
        draw.text((x - 10, y1 + 6), _label(t), fill="black", font=font)
    draw.text(((x0 + x1) // 2 - 20, HEIGHT - 16), xlabel, fill="black", font=font)
    draw.text((4, 8 + 12), ylabel, fill=(90, 90, 90), font=font)
    for i, (name, pts) in enumerate(series.items()):
        colour = COLOURS[i % len(COLOURS)]
        pts = [at(x, y) for x, y in pts if math.isfinite(x) and math.isfinite(y)]
        if len(pts) > 1:
            draw.line(pts, fill=colour, width=2)
        elif pts:
            draw.ellipse([pts[0][0] - 2, pts[0][1] - 2, pts[0][0] + 2, pts[0][1] + 2], fill=colour)
        draw.line([x1 - 160, y0 + 12 + 14 * i, x1 - 146, y0 + 12 + 14 * i], fill=colour, width=3)
        draw.text((x1 - 140, y0 + 6 + 14 * i), name, fill=colour, font=font)
    return _png(image)


def bar_plot(groups: dict[str, dict[str, float | None]], title: str, ylabel: str) -> bytes:
    """Grouped bars: one group per metric, one bar per entry (same entry order and colour in every group); a missing
    value leaves its slot empty; each bar labelled with its value."""
    font = ImageFont.load_default()
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    x0, y0, x1, y1 = MARGIN_L, MARGIN_T, WIDTH - MARGIN_R, HEIGHT - MARGIN_B
    draw.text((x0, 8), title, fill="black", font=font)
    names = list(dict.fromkeys(n for bars in groups.values() for n in bars))
    values = [v for bars in groups.values() for v in bars.values() if v is not None and math.isfinite(v)]
    yhi = max([1.0] + values) if values and max(values) > 1 else 1.0
    ylo = min([0.0] + values)
    draw.rectangle([x0, y0, x1, y1], outline=(120, 120, 120))

    def y_of(v: float) -> float:
        return y1 - (v - ylo) / (yhi - ylo) * (y1 - y0)

    for t in _ticks(ylo, yhi):
        draw.line([x0, y_of(t), x1, y_of(t)], fill=(230, 230, 230))
        draw.text((4, y_of(t) - 6), _label(t), fill="black", font=font)
    draw.text((4, 20), ylabel, fill=(90, 90, 90), font=font)
    if groups and names:
        group_w = (x1 - x0) / len(groups)
        bar_w = group_w * 0.8 / len(names)
        for g, (group, bars) in enumerate(groups.items()):
            left = x0 + g * group_w + group_w * 0.1
            for i, name in enumerate(names):
                value = bars.get(name)
                if value is None or not math.isfinite(value):
                    continue
                bx = left + i * bar_w
                draw.rectangle([bx, min(y_of(value), y_of(0)), bx + bar_w - 2, max(y_of(value), y_of(0))],
                               fill=COLOURS[i % len(COLOURS)])
                draw.text((bx, y_of(value) - 12), f"{value:.2f}", fill="black", font=font)
            draw.text((left, y1 + 6), group, fill="black", font=font)
        for i, name in enumerate(names):
            draw.rectangle([x1 - 170, y0 + 8 + 14 * i, x1 - 162, y0 + 16 + 14 * i], fill=COLOURS[i % len(COLOURS)])
            draw.text((x1 - 156, y0 + 6 + 14 * i), name, fill=COLOURS[i % len(COLOURS)], font=font)
    return _png(image)


def loss_curve(records: list[dict]) -> bytes | None:
    """controlnet_train's metrics.jsonl records (`step`, `loss`, ...) as a PNG; None when none has a loss."""
    points = [(float(r["step"]), float(r["loss"])) for r in records
              if isinstance(r.get("step"), (int, float)) and isinstance(r.get("loss"), (int, float))]
    if not points:
        return None
    series = {"loss": points}
    if len(points) >= 5:  # a running mean over a tenth of the points: the trend through the noise of small batches
        k = max(2, len(points) // 10)
        series[f"mean of {k}"] = [(points[i][0], sum(p[1] for p in points[i - k + 1:i + 1]) / k) for i in range(k - 1, len(points))]
    return line_plot(series, "controlnet_train: training loss", "step", "loss")


FIDELITY_KEYS = ("canny_f1", "canny_fidelity", "clip_score", "pose_pck")


def fidelity_bars(summary: dict) -> bytes | None:
    """evaluate's summary as bars: per fidelity metric, untrained | trained (and the canny F1's floor and ceiling)."""
    trained, untrained = summary.get("metrics") or {}, summary.get("metrics_untrained") or {}
    groups = {}
    for key in FIDELITY_KEYS:
        if key == "clip_score":
            continue  # another scale (×100); in the tables
        if key in trained or key in untrained:
            groups[key] = {"untrained ControlNet": untrained.get(key), "trained ControlNet": trained.get(key)}
    if "canny_f1" in groups:
        groups["canny_f1"].update({"reference (ceiling)": trained.get("canny_f1_reference"),
                                   "noise (floor)": trained.get("canny_f1_noise")})
    if not groups:
        return None
    return bar_plot(groups, "evaluate: control fidelity on held-out controls (same controls, prompts, seeds)", "score")
