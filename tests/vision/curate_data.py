"""A small images dataset with known duplicates and known bad rows, shaped like blip_caption's output (seed shards named
as download names them: clip_embed-<shard>), and clip_embed's output for its seed rows: what curate reads."""
from __future__ import annotations

import io
import pathlib

import numpy as np
import pyarrow as pa
from PIL import Image, ImageDraw

from cnpipe.dataset import Manifest, ShardedOutput, ShardResult
from components.download.stage import IMAGE_SCHEMA
from components.hub_load.stage import SEED_SCHEMA

SCORED = IMAGE_SCHEMA.append(pa.field("blip_caption", pa.string()))  # download carries LAION's scores (null: none)
UNSCORED = pa.schema([f for f in SCORED if f.name not in ("pwatermark", "punsafe")])  # a dataset without the columns


def scene(seed: int, size: int = 160, sibling: int = 0) -> Image.Image:
    """Coloured shapes on a gradient: `sibling` > 0 keeps the palette and background, moves every shape (a distinct
    picture that looks alike)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, 3)
    ramp = np.linspace(0, 1, size)[:, None, None]
    image = Image.fromarray((base * (0.4 + 0.6 * ramp) * np.ones((size, size, 3))).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    fills = [tuple(int(v) for v in rng.integers(0, 255, 3)) for _ in range(7)]
    place = np.random.default_rng(seed * 1000 + sibling)
    for fill in fills:
        x, y = (int(v) for v in place.integers(0, size * 3 // 4, 2))
        w, h = (int(v) for v in place.integers(size // 8, size // 3, 2))
        (draw.ellipse if place.random() < 0.5 else draw.rectangle)([x, y, x + w, y + h], fill=fill)
    return image


def encoded(image: Image.Image, fmt: str = "JPEG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **({"quality": 92} | kwargs if fmt == "JPEG" else kwargs))
    return buffer.getvalue()


def decoded(blob: bytes) -> Image.Image:
    return Image.open(io.BytesIO(blob)).convert("RGB")


def rows() -> list[dict]:
    """Every row with the verdict it must get (`expect`: kept, a reason, or reason:kept id)."""
    seed_a = encoded(scene(1))
    out = [
        dict(id="seed-a", image=seed_a, origin="folder:a.jpg", caption="shapes a", expect="kept"),
        dict(id="seed-b", image=encoded(scene(2)), origin="folder:b.jpg", caption="shapes b", expect="kept"),
        # the seed's pixels, another file format: a duplicate of the seed, however large
        dict(id="web-a-png", image=encoded(decoded(seed_a), "PNG"), origin="retrieval", caption="a", expect="duplicate:seed-a"),
        # the seed's picture, larger: a retrieved copy still loses to the seed
        dict(id="web-a-big", image=encoded(scene(1).resize((224, 224))), origin="retrieval", caption="a", expect="near_duplicate:seed-a"),
        dict(id="web-c-big", image=encoded(scene(3).resize((224, 224))), origin="retrieval", caption="c", expect="kept"),
        dict(id="web-c-small", image=encoded(scene(3).resize((120, 120)), quality=60), origin="retrieval", caption="c",
             expect="near_duplicate:web-c-big"),
        dict(id="web-c-crop", image=encoded(scene(3).resize((224, 224)).crop((11, 11, 213, 213))), origin="retrieval",
             caption="c", expect="near_duplicate:web-c-big"),
        dict(id="web-d", image=encoded(scene(4)), origin="retrieval", caption="d", expect="kept"),
        dict(id="web-d-sibling", image=encoded(scene(4, sibling=1)), origin="retrieval", caption="d", expect="kept"),
        dict(id="web-corrupt", image=b"<html>not an image</html>", origin="retrieval", caption="x", expect="not_an_image"),
        dict(id="web-small", image=encoded(scene(5, size=48)), origin="retrieval", caption="e", expect="low_resolution"),
        dict(id="web-long", image=encoded(scene(6).resize((400, 100))), origin="retrieval", caption="f", expect="bad_aspect_ratio"),
        dict(id="web-mark", image=encoded(scene(7)), origin="retrieval", caption="g", pwatermark=0.9, expect="watermarked"),
        dict(id="web-unsafe", image=encoded(scene(8)), origin="retrieval", caption="h", punsafe=0.8, expect="unsafe"),
        dict(id="web-a-png-2", image=encoded(decoded(seed_a), "PNG"), origin="retrieval", caption="a", expect="duplicate:seed-a"),
        dict(id="web-e", image=encoded(scene(9)), origin="retrieval", caption=None, expect="kept"),
        # plain pictures: no pHash (nothing to describe), told apart by their pixels: two colours, both kept
        dict(id="web-plain-red", image=encoded(Image.new("RGB", (120, 120), (200, 30, 30)), "PNG"), origin="retrieval",
             caption="red", expect="kept"),
        dict(id="web-plain-blue", image=encoded(Image.new("RGB", (120, 120), (30, 30, 200)), "PNG"), origin="retrieval",
             caption="blue", expect="kept"),
    ]
    return out


def make_datasets(root: pathlib.Path, embed, rows_per_shard: int = 4, scores: bool = True) -> tuple[Manifest, Manifest]:
    """(the images dataset as blip_caption leaves it, clip_embed's dataset of its seed rows with `embed(PIL images)`'s
    vectors). Seed rows come first, in shards named as download names the shards it passes through."""
    data = rows()
    seeds = [r for r in data if r["origin"] != "retrieval"]
    web = [r for r in data if r["origin"] == "retrieval"]
    schema = SCORED if scores else UNSCORED
    images = ShardedOutput(str(root / "images"), "blip_caption", "test", schema)
    embedded = ShardedOutput(str(root / "clip_embed"), "clip_embed", "test",
                             SEED_SCHEMA.append(pa.field("clip_embedding", pa.list_(pa.float32()))))
    names, seed_names = [], []
    for group, prefix in ((seeds, "clip_embed-"), (web, "laion_retrieval-")):
        for i in range(0, len(group), rows_per_shard):
            part = group[i:i + rows_per_shard]
            name = f"part-{i // rows_per_shard:05d}"
            images.commit(prefix + name, ShardResult(_images_table(part, schema)), rows_in=len(part))
            names.append(prefix + name)
            if prefix == "clip_embed-":
                pictures = [decoded(r["image"]) for r in part]
                t = pa.table({"id": [r["id"] for r in part], "image": [r["image"] for r in part],
                              "width": [p.size[0] for p in pictures], "height": [p.size[1] for p in pictures],
                              "url": [None] * len(part), "source_caption": [r["caption"] for r in part],
                              "origin": [r["origin"] for r in part],
                              "clip_embedding": [list(map(float, v)) for v in embed(pictures)]}, schema=embedded.schema)
                embedded.commit(name, ShardResult(t), rows_in=len(part))
                seed_names.append(name)
    return images.finalize(names, inputs=[]), embedded.finalize(seed_names, inputs=[])


def _images_table(part: list[dict], schema: pa.Schema) -> pa.Table:
    sizes = [decoded(r["image"]).size if r["expect"] != "not_an_image" else (None, None) for r in part]
    columns = {
        "id": [r["id"] for r in part], "image": [r["image"] for r in part],
        "width": [s[0] for s in sizes], "height": [s[1] for s in sizes],
        "url": [None if r["origin"] != "retrieval" else f"http://web/{r['id']}" for r in part],
        "source_caption": [r["caption"] if r["origin"] != "retrieval" else None for r in part],
        "origin": [r["origin"] for r in part], "similarity": [None] * len(part), "query": [None] * len(part),
        "blip_caption": [r["caption"] for r in part],
    }
    if "pwatermark" in schema.names:
        columns["pwatermark"] = [r.get("pwatermark") for r in part]
        columns["punsafe"] = [r.get("punsafe") for r in part]
    return pa.table(columns, schema=schema)
