"""Self-contained HTML pages for the Kubeflow UI: images inlined as base64 data URIs and plots as inline SVG.

The UI shows a kfp `HTML` artifact in a sandboxed frame and its `Markdown` viewer cannot load PNG files that live in
the bucket, so these pages carry every picture themselves and reference nothing outside them.
"""
from __future__ import annotations

import base64
import html
import io
import math

INLINE_PNG_MAX_BYTES = 1_500_000  # a larger picture is inlined downscaled as JPEG, so the page stays light in the UI
INLINE_MAX_SIDE = 2048

STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd;padding-bottom:4px}
table{border-collapse:collapse;margin:8px 0;font-size:0.92em}th,td{border:1px solid #ccc;padding:4px 8px;text-align:left}
th{background:#f3f3f3}td.n{text-align:right;font-variant-numeric:tabular-nums}code{font-size:0.9em;color:#444}
img{max-width:100%;height:auto;border:1px solid #ddd}figure{margin:8px 0}figcaption{color:#555;font-size:0.9em}
.muted{color:#666}
"""


def esc(value) -> str:
    return html.escape("" if value is None else str(value))


def image_data_uri(data: bytes) -> str:
    """A data URI for an image file's bytes: as it is when small, else downscaled to INLINE_MAX_SIDE and JPEG."""
    from PIL import Image

    if len(data) <= INLINE_PNG_MAX_BYTES:
        kind = "png" if data[:8] == b"\x89PNG\r\n\x1a\n" else "jpeg"
        return f"data:image/{kind};base64," + base64.b64encode(data).decode()
    image = Image.open(io.BytesIO(data)).convert("RGB")
    image.thumbnail((INLINE_MAX_SIDE, INLINE_MAX_SIDE))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=88)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def figure(data: bytes, alt: str, caption: str = "") -> str:
    text = f"<figcaption>{esc(caption)}</figcaption>" if caption else ""
    return f'<figure><img alt="{esc(alt)}" src="{image_data_uri(data)}">{text}</figure>'


def table(headers: list[str], rows: list[list], numeric: set[int] | None = None) -> str:
    numeric = numeric or set()
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f'<td class="n">{esc(c)}</td>' if i in numeric else f"<td>{esc(c)}</td>" for i, c in enumerate(row))
        + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def page(title: str, sections: list[str]) -> str:
    return (f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{esc(title)}</title><style>{STYLE}</style></head>'
            f"<body><h1>{esc(title)}</h1>" + "\n".join(sections) + "</body></html>\n")


def _ticks(low: float, high: float, count: int = 4) -> list[float]:
    if high <= low:
        return [low]
    step = (high - low) / count
    return [low + i * step for i in range(count + 1)]


def line_chart(series: dict[str, list[tuple[float, float]]], x_label: str, width: int = 640, height: int = 240) -> str:
    """An inline SVG line chart, one line per named series of (x, y) points, each series on its own y scale
    (labelled at the left for the first, the right for the second), e.g. loss and learning rate against step."""
    series = {k: [(x, y) for x, y in v if y is not None and math.isfinite(y)] for k, v in series.items()}
    series = {k: v for k, v in series.items() if v}
    if not series:
        return ""
    colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"]
    left, right, top, bottom = 64, 64, 16, 36
    xs = [x for points in series.values() for x, _ in points]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-size="11" '
             f'font-family="sans-serif"><rect width="{width}" height="{height}" fill="white"/>']
    plot_w, plot_h = width - left - right, height - top - bottom

    def px(x):
        return left + (x - x0) / (x1 - x0) * plot_w

    parts.append(f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" stroke="#999"/>')
    for x in _ticks(x0, x1):
        parts.append(f'<text x="{px(x):.1f}" y="{top + plot_h + 14}" text-anchor="middle">{x:.4g}</text>')
    parts.append(f'<text x="{left + plot_w / 2}" y="{height - 4}" text-anchor="middle">{esc(x_label)}</text>')
    for index, (name, points) in enumerate(series.items()):
        colour = colours[index % len(colours)]
        ys = [y for _, y in points]
        y0, y1 = min(ys), max(ys)
        if y1 <= y0:
            y0, y1 = y0 - 0.5 * (abs(y0) or 1), y1 + 0.5 * (abs(y1) or 1)

        def py(y):
            return top + plot_h - (y - y0) / (y1 - y0) * plot_h

        axis_x = left if index == 0 else left + plot_w
        anchor = "end" if index == 0 else "start"
        offset = -4 if index == 0 else 4
        if index < 2:
            parts.append(f'<line x1="{axis_x}" y1="{top}" x2="{axis_x}" y2="{top + plot_h}" stroke="{colour}"/>')
            for y in _ticks(y0, y1):
                parts.append(f'<text x="{axis_x + offset}" y="{py(y) + 4:.1f}" text-anchor="{anchor}" fill="{colour}">{y:.3g}</text>')
        path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in points)
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{path}"/>')
        parts.append(f'<text x="{left + 8 + 120 * index}" y="{top + 10}" fill="{colour}">— {esc(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def bar_chart(rows: list[tuple[str, int, int]], width: int = 640) -> str:
    """An inline SVG of rows in (light) and rows out (dark) per stage, one bar pair per line, on one scale."""
    rows = [r for r in rows if r[1] is not None and r[2] is not None]
    if not rows:
        return ""
    label_w, bar_h, gap = 150, 14, 8
    top = max(max(r[1], r[2]) for r in rows) or 1
    height = len(rows) * (bar_h + gap) + 24
    scale = (width - label_w - 60) / top
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-size="11" '
             f'font-family="sans-serif"><rect width="{width}" height="{height}" fill="white"/>']
    for i, (name, rows_in, rows_out) in enumerate(rows):
        y = 8 + i * (bar_h + gap)
        parts.append(f'<text x="{label_w - 6}" y="{y + bar_h - 3}" text-anchor="end">{esc(name)}</text>')
        parts.append(f'<rect x="{label_w}" y="{y}" width="{rows_in * scale:.1f}" height="{bar_h}" fill="#c6dbef"/>')
        parts.append(f'<rect x="{label_w}" y="{y + 3}" width="{rows_out * scale:.1f}" height="{bar_h - 6}" fill="#2171b5"/>')
        parts.append(f'<text x="{label_w + rows_in * scale + 4:.1f}" y="{y + bar_h - 3}">{rows_out} / {rows_in}</text>')
    y = height - 6
    parts.append(f'<text x="{label_w}" y="{y}" fill="#555">light: rows in, dark: rows out</text></svg>')
    return "".join(parts)


def training_curve(records: list[dict]) -> str:
    """Loss (and learning rate) against step from controlnet_train's metrics.jsonl records, as inline SVG."""
    loss = [(r["step"], r.get("loss")) for r in records if "step" in r]
    lr = [(r["step"], r.get("lr")) for r in records if "step" in r]
    return line_chart({"loss": loss, "learning rate": lr}, "step")
