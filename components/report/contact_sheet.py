"""A PNG a person can look at: for sample rows, the image, its captions and its control images side by side."""
from __future__ import annotations

import io
import textwrap

from PIL import Image, ImageDraw, ImageFont

CELL = 192
TEXT_WIDTH = 260


def _thumbnail(blob: bytes | None) -> Image.Image:
    cell = Image.new("RGB", (CELL, CELL), (24, 24, 24))
    if blob is None:
        return cell
    image = Image.open(io.BytesIO(blob)).convert("RGB")
    image.thumbnail((CELL, CELL))
    cell.paste(image, ((CELL - image.width) // 2, (CELL - image.height) // 2))
    return cell


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the bitmap font
        return ImageFont.load_default()


def render(rows: list[dict], control_types: list[str]) -> Image.Image:
    """rows: {"image", "caption", "blip_caption", "source_caption", "controls": {type: bytes | reason str}}."""
    header = 28
    columns = ["image", "captions", *control_types]
    width = CELL * (1 + len(control_types)) + TEXT_WIDTH
    sheet = Image.new("RGB", (width, header + CELL * max(1, len(rows))), "white")
    draw = ImageDraw.Draw(sheet)
    font, small = _font(16), _font(12)
    x = 0
    for name in columns:
        draw.text((x + 6, 6), name, fill="black", font=font)
        x += TEXT_WIDTH if name == "captions" else CELL
    for r, row in enumerate(rows):
        y = header + r * CELL
        sheet.paste(_thumbnail(row["image"]), (0, y))
        lines = []
        for label, key in (("train", "caption"), ("source", "source_caption"), ("blip", "blip_caption")):
            lines += textwrap.wrap(f"{label}: {row.get(key) or '-'}", 38)[:3]
        draw.multiline_text((CELL + 6, y + 6), "\n".join(lines), fill="black", font=small, spacing=3)
        for c, name in enumerate(control_types):
            x = CELL + TEXT_WIDTH + c * CELL
            control = row["controls"].get(name)
            if isinstance(control, bytes):
                sheet.paste(_thumbnail(control), (x, y))
            else:
                sheet.paste(_thumbnail(None), (x, y))
                draw.text((x + 10, y + CELL // 2 - 8), f"rejected: {control or 'n/a'}", fill=(230, 120, 120), font=small)
    return sheet


def to_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()
