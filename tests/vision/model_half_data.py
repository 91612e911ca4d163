"""Shared test data of the model half: the tiny base model and a small conditioning dataset.

Both are built once per test session under pytest's base temp folder (idempotent builders, so the
encode and evaluate test modules share them).
"""
from __future__ import annotations

import io
import pathlib

import cv2
import numpy as np
import pyarrow as pa
from PIL import Image, ImageDraw

import pipeline_configs
from cnpipe.dataset import ShardedOutput, ShardResult

CONDITIONING_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("image", pa.binary()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("caption", pa.string()),
        ("blip_caption", pa.string()),
        ("source_caption", pa.string()),
        ("control", pa.binary()),
        ("origin", pa.string()),
    ]
)
CORRUPT_ID = "row-2"
NO_CAPTION_ID = "row-4"
ROWS_PER_SHARD = 3
NUM_ROWS = 9


def assets(basetemp: pathlib.Path) -> pathlib.Path:
    """The embedded preset's assets folder, with tiny-sd and tiny-clip under models/."""
    from cnpipe.embedded import tiny_models, tiny_sd

    root = basetemp / "assets"
    tiny_sd.ensure(str(root / "models"))
    if not (root / "models" / "tiny-clip" / "model.safetensors").exists():
        tmp = root / "models" / ".tmp-tiny-clip"
        tiny_models.build_clip(tmp)
        tmp.rename(root / "models" / "tiny-clip")
    return root


def config(assets_dir: pathlib.Path, **encode) -> pipeline_configs.PipelineConfig:
    cfg = pipeline_configs.embedded(str(assets_dir))
    for key, value in {"batch_size": 2, "holdout_fraction": 0.4, **encode}.items():
        setattr(cfg.encode, key, value)
    return cfg


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _scene(i: int, size: tuple[int, int]) -> Image.Image:
    rng = np.random.default_rng(i)
    image = Image.new("RGB", size, tuple(int(v) for v in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(image)
    for _ in range(3):
        x0, y0 = int(rng.integers(0, size[0] // 2)), int(rng.integers(0, size[1] // 2))
        box = [x0, y0, x0 + int(rng.integers(15, size[0] // 2)), y0 + int(rng.integers(15, size[1] // 2))]
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
    return image


def _row(i: int) -> dict:
    size = (96, 72) if i % 2 else (72, 96)  # landscape and portrait: the centre crop matters
    image = _scene(i, size)
    edges = cv2.Canny(cv2.cvtColor(np.asarray(image), cv2.COLOR_RGB2GRAY), 100, 200)
    jpeg = io.BytesIO()
    image.save(jpeg, format="JPEG", quality=95)
    row = {
        "id": f"row-{i}", "image": jpeg.getvalue(), "width": size[0], "height": size[1],
        "caption": f"a picture of shapes number {i}", "blip_caption": f"shapes {i}",
        "source_caption": f"a picture of shapes number {i}" if i % 3 else None,
        "control": _png(np.stack([edges] * 3, axis=-1)), "origin": "seed",
    }
    if row["id"] == CORRUPT_ID:
        row["image"] = b"\xff\xd8\xff\xe0" + bytes(range(64))
    if row["id"] == NO_CAPTION_ID:
        row.update(caption="", blip_caption="", source_caption=None)
    return row


def conditioning(basetemp: pathlib.Path) -> str:
    """`<root>/conditioning/canny`: 9 rows in 3 shards, one corrupt image, one row without any caption."""
    uri = str(basetemp / "conditioning" / "canny")
    if (basetemp / "conditioning" / "canny" / "manifest.json").exists():
        return uri
    out = ShardedOutput(uri, "conditioning", "fixture", CONDITIONING_SCHEMA)
    names = []
    for start in range(0, NUM_ROWS, ROWS_PER_SHARD):
        name = f"{start // ROWS_PER_SHARD:05d}"
        rows = [_row(i) for i in range(start, start + ROWS_PER_SHARD)]
        out.commit(name, ShardResult(pa.Table.from_pylist(rows, schema=CONDITIONING_SCHEMA)), rows_in=len(rows))
        names.append(name)
    out.finalize(names, inputs=[])
    return uri
