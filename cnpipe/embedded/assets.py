"""The embedded default's data, made on this machine: scikit-image's bundled photos plus generated ones.

seeds/  the hub-load folder: good images with sidecar captions, plus the awkward cases a real
        folder holds (CMYK, 16-bit, RGBA, corrupt, truncated, 1x1, HTML named .jpg, bad captions).
pool/   the "web" that the loopback LAION stand-in indexes and serves: variants of the photos, plus
        entries that fail the way web URLs do (404, HTML page, too small, truncated), and duplicates as the web has
        them (curate removes them): a seed's picture at two more URLs and sizes, one file at two URLs.
"""
from __future__ import annotations

import io
import json
import os
import pathlib

import numpy as np
from PIL import Image, ImageDraw, ImageOps

PHOTOS = {
    "astronaut.png": "an astronaut in a space suit holding a helmet",
    "camera.png": "a man standing with a camera on a tripod",
    "chelsea.png": "a cat looking at the camera",
    "coffee.png": "a cup of coffee on a table",
    "rocket.jpg": "a rocket on a launch pad",
    "motorcycle_left.png": "a red motorcycle",
    "horse.png": "a black horse silhouette",
    "coins.png": "old coins on a table",
}


def _photo(name: str) -> Image.Image:
    import skimage

    return Image.open(os.path.join(os.path.dirname(skimage.__file__), "data", name)).convert("RGB")


def _pattern(seed: int, size: int = 192) -> Image.Image:
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(0, 255, 3)))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x0, y0 = rng.integers(0, size - 40, 2)
        w, h = rng.integers(20, 80, 2)
        fill = tuple(int(v) for v in rng.integers(0, 255, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([int(x0), int(y0), int(x0 + w), int(y0 + h)], fill=fill)
    return image


def _save(image: Image.Image, path: pathlib.Path, **kwargs) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)


def make_seeds(folder: pathlib.Path) -> None:
    for name, caption in PHOTOS.items():
        stem = name.rsplit(".", 1)[0]
        _save(_photo(name), folder / f"{stem}.jpg", quality=92)
        (folder / f"{stem}.txt").write_text(caption)
    for i in range(4):
        _save(_pattern(i), folder / f"pattern_{i}.png")
        (folder / f"pattern_{i}.txt").write_text("a colorful pattern of shapes")
    # Awkward but usable: converted, counted as kept.
    _save(_photo("chelsea.png").convert("CMYK"), folder / "odd_cmyk.jpg")
    sixteen = (np.asarray(_photo("coffee.png").convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    _save(Image.fromarray(sixteen), folder / "odd_16bit.png")
    rgba = _pattern(7).convert("RGBA")
    rgba.putalpha(128)
    _save(rgba, folder / "odd_rgba.png")
    (folder / "odd_rgba.txt").write_text("   ")  # empty caption: dropped, counted
    (folder / "odd_cmyk.txt").write_bytes(b"a cat \xff\xfe in cmyk")  # not UTF-8: dropped, counted
    # Unusable: rejected with a reason each.
    good = io.BytesIO()
    _photo("rocket.jpg").save(good, format="JPEG")
    (folder / "bad_truncated.jpg").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    (folder / "bad_corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + os.urandom(64))
    _save(Image.new("RGB", (1, 1), (255, 0, 0)), folder / "bad_1x1.png")
    (folder / "bad_html.jpg").write_text("<!doctype html><html><body>Not Found</body></html>")


def make_pool(folder: pathlib.Path) -> list[dict]:
    """Write the pool's files; return its index entries (path served, caption, file to embed)."""
    entries = []

    def add(image: Image.Image, name: str, caption: str) -> None:
        _save(image, folder / name, quality=90)
        entries.append({"path": name, "caption": caption, "embed": name})

    for name, caption in PHOTOS.items():
        photo, stem = _photo(name), name.rsplit(".", 1)[0]
        w, h = photo.size
        add(ImageOps.mirror(photo), f"{stem}_mirror.jpg", caption + ", mirrored")
        add(photo.crop((w // 8, h // 8, w - w // 8, h - h // 8)), f"{stem}_crop.jpg", "close up of " + caption)
        add(ImageOps.autocontrast(ImageOps.posterize(photo, 3)), f"{stem}_poster.jpg", caption + ", posterized")
    for i in range(8, 14):
        add(_pattern(i), f"pattern_{i}.jpg", "a colorful pattern of shapes")
    # Duplicates, on purpose: the cat of the chelsea seed at two URLs and two sizes (both near duplicates of the seed,
    # which curate keeps), and one file served at two URLs (an exact duplicate of a retrieved row).
    cat = _photo("chelsea.png")
    add(cat, "chelsea_web.jpg", "a cat looking at the camera")
    add(cat.resize((cat.width // 2, cat.height // 2), Image.Resampling.LANCZOS), "chelsea_web_small.jpg", "cat photo, small")
    (folder / "rocket_mirror_copy.jpg").write_bytes((folder / "rocket_mirror.jpg").read_bytes())
    entries.append({"path": "rocket_mirror_copy.jpg", "caption": "a rocket on a launch pad, mirrored", "embed": "rocket_mirror.jpg"})
    # Web failures, indexed with a real neighbour's embedding as LAION's rotted URLs are.
    (folder / "page.jpg").write_text("<!doctype html><html><body>an HTML page, not an image</body></html>")
    _save(Image.new("RGB", (8, 8), (0, 0, 255)), folder / "tiny.jpg")
    truncated = (folder / "pattern_8.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(truncated[: len(truncated) // 3])
    for path, neighbour in (("page.jpg", "astronaut_mirror.jpg"), ("tiny.jpg", "chelsea_crop.jpg"),
                            ("truncated.jpg", "pattern_8.jpg"), ("gone_404.jpg", "rocket_mirror.jpg")):
        entries.append({"path": path, "caption": "a broken web image", "embed": neighbour})
    (folder / "index.json").write_text(json.dumps(entries, indent=1))
    return entries


# Bumped when what make_<name> writes changes: a folder made by an older version is made again (the pool's index,
# orchestration.local_web, is rebuilt when the pool's index.json changes).
VERSIONS = {"seeds": 1, "pool": 2}
VERSION_FILE = ".version"


def ensure(root: str) -> None:
    import shutil

    base = pathlib.Path(root)
    for name, make in (("seeds", make_seeds), ("pool", make_pool)):
        target, version = base / name, str(VERSIONS[name])
        current = (target / VERSION_FILE).read_text().strip() if (target / VERSION_FILE).exists() else "1"
        if target.exists() and current == version:
            continue
        tmp = base / f".tmp-{name}-{os.getpid()}"
        tmp.mkdir(parents=True, exist_ok=True)
        make(tmp)
        (tmp / VERSION_FILE).write_text(version)
        if target.exists():  # an older version: swapped out, then removed
            old = base / f".old-{name}-{os.getpid()}"
            target.rename(old)
            shutil.rmtree(old, ignore_errors=True)
        tmp.rename(target)


if __name__ == "__main__":
    import sys

    ensure(sys.argv[1])
