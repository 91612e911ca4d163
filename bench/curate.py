"""Curate: how well the dedup finds duplicates, how fast the stage runs against a plain loop, how its memory grows.

    PYTHONPATH=. .venvs/vision/bin/python bench/curate.py [--bases 240] [--scale 10] [--repeats 3] [--keys-rows 25000,100000]
        [--keys-index auto] [--only quality|speed|memory|keys]

1. Quality. A generated set with known duplicates: scikit-image's photos cut into windows and coloured-shape scenes
   (both stored as JPEG q92) are the originals; about 60 % of them get 1-3 copies, each made by one recipe:
       resize        0.35-0.9x, Lanczos
       recompress    JPEG q30-85
       reencode      PNG of the decoded original (the same pixels: an exact duplicate)
       webp          WebP q60-90
       crop          each side cut by 0-5 %
       jitter        brightness and contrast 0.85-1.15x, saturation 0.7-1.3x
       resize+jpeg   0.5-0.9x then JPEG q40-80
       crop+resize   each side cut by 0-4 %, then 0.6-0.9x
   Those are what counts as a duplicate. Distinct pictures that look alike must stay apart: the other windows of the
   same photo, the two views of scikit-image's stereo motorcycle, and scene siblings (same background and palette,
   every shape moved). The stage runs on it (curate_keys, curate_dedup, curate: the functions kfp runs); a dropped
   row is a true positive when the row it names as kept is a copy of the same original. Precision = true / dropped,
   recall = true / (rows - originals); also per recipe, and for each dedup signal alone. Target: recall >= 0.95 at
   precision >= 0.99 (exact + pHash, the embedded preset's setting: the tiny CLIP has random weights).
2. Speed. The same images through our three steps vs a plain single-process loop doing the same work (decode,
   pixel hash, pHashes, CLIP embedding one image at a time, caption similarity, then for each row in priority order a
   brute-force comparison with every kept row, then the kept rows written), same model, interleaved, best of N.
3. Memory. Each step as the command kfp runs (`python -m ...`, /usr/bin/time's max RSS) on the set and on a set
   --scale times larger (more originals, same shard size): target 10x/1x < 1.5. And the global pass alone on
   synthetic keys (--keys-rows: 768-d embeddings, 5 % near copies, 1 % exact; --keys-index: curate.embedding_index,
   e.g. IVF1024,PQ64): its memory and time per million rows.
Writes bench/results/curate.json.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance

import benchlib  # noqa: E402  (puts the repo on sys.path)

RECIPES = ["resize", "recompress", "reencode", "webp", "crop", "jitter", "resize+jpeg", "crop+resize"]
ROWS_PER_SHARD = 64


# ---------------------------------------------------------------- the generated set

def skimage_photos() -> list[tuple[str, Image.Image]]:
    """scikit-image's bundled photos (its package lives in the core family's environment)."""
    from cnpipe.families import family_python

    folder = subprocess.run([family_python("core"), "-c", "import os, skimage; print(os.path.join(os.path.dirname(skimage.__file__), 'data'))"],
                            capture_output=True, text=True, check=True).stdout.strip()
    names = ["astronaut.png", "brick.png", "camera.png", "cell.png", "chelsea.png", "coffee.png", "coins.png", "color.png",
             "grass.png", "gravel.png", "horse.png", "hubble_deep_field.jpg", "ihc.png", "logo.png", "microaneurysms.png",
             "moon.png", "motorcycle_left.png", "motorcycle_right.png", "page.png", "phantom.png", "retina.jpg", "rocket.jpg",
             "text.png", "clock_motion.png"]
    return [(n, Image.open(os.path.join(folder, n)).convert("RGB")) for n in names if os.path.exists(os.path.join(folder, n))]


def scene(family: int, sibling: int, size: int = 256) -> Image.Image:
    """Coloured shapes on a gradient; siblings share background and palette, every shape is moved."""
    rng = np.random.default_rng(family)
    top, bottom = rng.integers(0, 255, 3), rng.integers(0, 255, 3)
    ramp = np.linspace(0, 1, size)[:, None, None]
    image = Image.fromarray((top * (1 - ramp) + bottom * ramp + np.zeros((size, size, 3))).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    fills = [tuple(int(v) for v in rng.integers(0, 255, 3)) for _ in range(int(rng.integers(5, 10)))]
    place = np.random.default_rng(family * 7919 + sibling + 1)
    for fill in fills:
        x, y = (int(v) for v in place.integers(0, size * 3 // 4, 2))
        w, h = (int(v) for v in place.integers(size // 10, size // 3, 2))
        kind = place.random()
        box = [x, y, x + w, y + h]
        if kind < 0.4:
            draw.ellipse(box, fill=fill)
        elif kind < 0.8:
            draw.rectangle(box, fill=fill)
        else:
            draw.line(box, fill=fill, width=int(place.integers(3, 12)))
    return image


def jpeg(image: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def decoded(blob: bytes) -> Image.Image:
    return Image.open(io.BytesIO(blob)).convert("RGB")


def crop(image: Image.Image, rng, most: float) -> Image.Image:
    w, h = image.size
    left, top, right, bottom = rng.uniform(0, most, 4)
    return image.crop((round(w * left), round(h * top), round(w * (1 - right)), round(h * (1 - bottom))))


def resized(image: Image.Image, scale: float) -> Image.Image:
    return image.resize((max(16, round(image.width * scale)), max(16, round(image.height * scale))), Image.Resampling.LANCZOS)


def copy_of(original: bytes, recipe: str, rng) -> bytes:
    image = decoded(original)
    if recipe == "resize":
        return jpeg(resized(image, rng.uniform(0.35, 0.9)), 92)
    if recipe == "recompress":
        return jpeg(image, int(rng.integers(30, 86)))
    if recipe == "reencode":
        return encode(image, "PNG")
    if recipe == "webp":
        return encode(image, "WEBP", quality=int(rng.integers(60, 91)))
    if recipe == "crop":
        return jpeg(crop(image, rng, 0.05), 92)
    if recipe == "jitter":
        image = ImageEnhance.Brightness(image).enhance(rng.uniform(0.85, 1.15))
        image = ImageEnhance.Contrast(image).enhance(rng.uniform(0.85, 1.15))
        return jpeg(ImageEnhance.Color(image).enhance(rng.uniform(0.7, 1.3)), 92)
    if recipe == "resize+jpeg":
        return jpeg(resized(image, rng.uniform(0.5, 0.9)), int(rng.integers(40, 81)))
    if recipe == "crop+resize":
        return jpeg(resized(crop(image, rng, 0.04), rng.uniform(0.6, 0.9)), 92)
    raise ValueError(recipe)


def originals(count: int, photos: list) -> list[tuple[str, Image.Image]]:
    """(look-alike family, picture): every photo as four corner windows (60 % of its shorter side), then scene
    siblings in pairs up to `count`."""
    out = []
    for name, photo in photos:
        w, h = photo.size
        side = int(min(w, h) * 0.6)
        for x in (0, w - side):
            for y in (0, h - side):
                family = "motorcycle" if name.startswith("motorcycle") else name
                out.append((f"photo:{family}", photo.crop((x, y, x + side, y + side))))
    family = 0
    while len(out) < count:
        for sibling in range(2):
            out.append((f"scene:{family}", scene(family, sibling)))
        family += 1
    return out[:count]


def generated_set(count: int, seed: int = 0) -> list[dict]:
    """Rows: id, image, origin (10 % seeds), caption, group (its original), recipe ("" for an original), family."""
    rng = np.random.default_rng(seed)
    rows = []
    for number, (family, picture) in enumerate(originals(count, skimage_photos())):
        blob = jpeg(picture, 92)
        origin = "folder:seed" if rng.random() < 0.1 else "retrieval"
        caption = f"picture {number} of {family}"
        rows.append({"id": f"o{number:05d}", "image": blob, "origin": origin, "caption": caption, "group": number,
                     "recipe": "", "family": family})
        for c in range(int(rng.choice([0, 1, 2, 3], p=[0.4, 0.3, 0.2, 0.1]))):
            recipe = RECIPES[int(rng.integers(len(RECIPES)))]
            rows.append({"id": f"o{number:05d}-c{c}", "image": copy_of(blob, recipe, rng), "origin": "retrieval",
                         "caption": caption, "group": number, "recipe": recipe, "family": family})
    order = rng.permutation(len(rows))  # copies are spread over the dataset, not next to their original
    return [rows[i] for i in order]


def write_dataset(rows: list[dict], root: pathlib.Path) -> tuple:
    """The rows as blip_caption leaves its output (seed rows first, in their own shards, as download passes them)."""
    import pyarrow as pa

    from cnpipe.dataset import ShardedOutput, ShardResult
    from components.download.stage import IMAGE_SCHEMA

    schema = IMAGE_SCHEMA.append(pa.field("blip_caption", pa.string()))
    out = ShardedOutput(str(root / "images"), "blip_caption", "bench", schema)
    names = []
    for prefix, part in (("seeds", [r for r in rows if r["origin"] != "retrieval"]),
                         ("web", [r for r in rows if r["origin"] == "retrieval"])):
        for start in range(0, len(part), ROWS_PER_SHARD):
            chunk = part[start:start + ROWS_PER_SHARD]
            sizes = [decoded(r["image"]).size for r in chunk]
            table = pa.table({
                "id": [r["id"] for r in chunk], "image": [r["image"] for r in chunk],
                "width": [s[0] for s in sizes], "height": [s[1] for s in sizes],
                "url": [f"http://web/{r['id']}" for r in chunk], "source_caption": [None] * len(chunk),
                "origin": [r["origin"] for r in chunk], "similarity": [None] * len(chunk), "query": [None] * len(chunk),
                "pwatermark": [None] * len(chunk), "punsafe": [None] * len(chunk), "blip_caption": [r["caption"] for r in chunk]}, schema=schema)
            name = f"{prefix}-{start // ROWS_PER_SHARD:05d}"
            out.commit(name, ShardResult(table), rows_in=len(chunk))
            names.append(name)
    return out.finalize(names, inputs=[])


def bench_config(models: pathlib.Path, **curate):
    import pipeline_configs

    config = pipeline_configs.embedded(str(models.parent))
    config.clip_embed.model = str(models / "tiny-clip")
    for key, value in {"min_side": 16, "max_aspect_ratio": 10.0, "batch_size": 32, "device": "cpu", **curate}.items():
        setattr(config.curate, key, value)
    return config


# ---------------------------------------------------------------- 1. quality

def scores(rows: list[dict], dropped: dict[str, str]) -> dict:
    """Precision and recall of the dropped rows (id -> kept id) against the known groups, overall and per recipe."""
    group = {r["id"]: r["group"] for r in rows}
    true = {i for i, kept in dropped.items() if group[i] == group[kept]}
    duplicates = len(rows) - len({r["group"] for r in rows})
    result = {"rows": len(rows), "duplicates": duplicates, "dropped": len(dropped), "true": len(true),
              "precision": round(len(true) / len(dropped), 4) if dropped else 1.0,
              "recall": round(len(true) / duplicates, 4) if duplicates else 1.0, "recipes": {}}
    # per recipe: a copy counts as found when it, or its original (the copy may have been kept: a jitter the same
    # size), was dropped for a row of its group
    found = {r["group"] for r in rows if r["id"] in true}
    for recipe in RECIPES:
        copies = [r for r in rows if r["recipe"] == recipe]
        hit = sum(1 for r in copies if r["id"] in true or (r["id"] not in dropped and r["group"] in found
                                                            and any(o["id"] in true for o in rows if o["group"] == r["group"] and o["recipe"] == "")))
        result["recipes"][recipe] = {"copies": len(copies), "recall": round(hit / len(copies), 4) if copies else None}
    wrong = [(i, kept, next(r["family"] for r in rows if r["id"] == i), next(r["family"] for r in rows if r["id"] == kept))
             for i, kept in dropped.items() if i not in true]
    result["false_merges"] = [{"dropped": a, "kept": b, "families": [fa, fb]} for a, b, fa, fb in wrong[:10]]
    return result


def quality(rows: list[dict], work: pathlib.Path, models: pathlib.Path, embedding_cosine: float) -> dict:
    from components.curate import dedup, keys

    images = write_dataset(rows, work)
    config = bench_config(models)
    manifest = keys.run(config, {"images": images}, str(work / "keys"))
    variants = {
        "exact": dict(phash_dedup=False, embedding_dedup=False),
        "phash": dict(exact_dedup=False, embedding_dedup=False),
        "exact+phash (embedded preset)": dict(embedding_dedup=False),
        f"embedding >= {embedding_cosine} (tiny random CLIP)": dict(exact_dedup=False, phash_dedup=False, embedding_dedup=True,
                                                                  embedding_min_cosine=embedding_cosine),
        f"exact+phash+embedding >= {embedding_cosine}": dict(embedding_dedup=True, embedding_min_cosine=embedding_cosine),
    }
    ids = {}
    for shard in manifest.shards:
        ids[shard["name"]] = __import__("cnpipe.storage", fromlist=["x"]).read_parquet(
            f"{manifest.uri}/data/{shard['name']}.parquet", columns=["id"]).column("id").to_pylist()
    flat_ids = [i for s in manifest.shards for i in ids[s["name"]]]
    out = {}
    for name, settings in variants.items():
        config = bench_config(models, **settings)
        loaded = dedup.Keys(manifest, config)
        result = dedup.greedy(loaded, config)
        dropped = {flat_ids[p]: flat_ids[int(result["match"][p])] for p in np.flatnonzero(result["reason"] > 0)}
        out[name] = scores(rows, dropped)
        print(f"  {name}: precision {out[name]['precision']}, recall {out[name]['recall']}", file=sys.stderr)
    return out


# ---------------------------------------------------------------- 2. speed

def ours(images, config, root: pathlib.Path) -> int:
    """Our three steps, as their commands run them (the functions kfp's tasks call), one shard group."""
    import shutil

    from components.curate import dedup, keys
    from components.curate import stage as curate

    shutil.rmtree(root, ignore_errors=True)
    key_set = keys.run(config, {"images": images}, str(root / "keys"))
    decided = dedup.run(config, {"keys": key_set}, str(root / "dedup"))
    return curate.run(config, {"images": images, "keys": key_set, "dedup": decided}, str(root / "out")).rows_out


def plain_loop(images, config, out: pathlib.Path) -> int:
    """What one would write without the stage: read every row, decode, hash, embed image and caption one at a time
    with transformers, then keep each row unless a kept row (all of them compared, NumPy) is its duplicate, and
    write the kept rows. Same hashes, same CLIP, same rule and thresholds."""
    import hashlib

    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

    from cnpipe import storage
    from components.curate.hashes import phash
    from components.curate.keys import centre_crop

    cfg = config.curate
    model = CLIPModel.from_pretrained(config.clip_embed.model).eval()
    processor = CLIPImageProcessor.from_pretrained(config.clip_embed.model)
    tokenizer = CLIPTokenizer.from_pretrained(config.clip_embed.model)
    tables = [storage.read_parquet(url) for _, url in images.shard_urls()]
    table = pa.concat_tables(tables)
    scales = [1.0, *cfg.phash_crop_scales]
    rows = []
    for row in table.to_pylist():
        image = Image.open(io.BytesIO(row["image"])).convert("RGB")
        pixels = np.asarray(image)
        digest = hashlib.blake2b(np.asarray(pixels.shape, dtype=np.int64).tobytes() + pixels.tobytes(), digest_size=8).digest()
        hashes = [phash(centre_crop(image, s)) for s in scales]
        with torch.inference_mode():
            vector = torch.nn.functional.normalize(model.get_image_features(**processor(images=[image], return_tensors="pt")), dim=-1)[0]
            text = torch.nn.functional.normalize(model.get_text_features(**tokenizer([row["blip_caption"]], padding=True, truncation=True,
                                                                                      max_length=77, return_tensors="pt")), dim=-1)[0]
        rows.append({"row": row, "pixel": digest, "phash": hashes, "similarity": float(vector @ text),
                     "area": image.width * image.height, "seed": row["origin"] != "retrieval"})
    order = sorted(range(len(rows)), key=lambda i: (not rows[i]["seed"], -rows[i]["area"], i))
    kept, kept_pixels, kept_whole, kept_all = [], set(), [], []
    for i in order:
        r = rows[i]
        if r["pixel"] in kept_pixels:
            continue
        if kept_whole:
            whole, every = np.asarray(kept_whole, dtype=np.uint64), np.asarray(kept_all, dtype=np.uint64)
            mine = np.asarray([h for h in r["phash"] if h is not None], dtype=np.uint64)
            if r["phash"][0] is not None and np.bitwise_count(every ^ np.uint64(r["phash"][0])).min() <= cfg.phash_max_distance:
                continue
            if len(mine) and np.bitwise_count(whole[:, None] ^ mine[None, :]).min() <= cfg.phash_max_distance:
                continue
        kept.append(i)
        kept_pixels.add(r["pixel"])
        if r["phash"][0] is not None:
            kept_whole.append(r["phash"][0])
        kept_all += [h for h in r["phash"] if h is not None]
    out.mkdir(parents=True, exist_ok=True)
    result = pa.Table.from_pylist([{**rows[i]["row"], "clip_similarity": rows[i]["similarity"]} for i in sorted(kept)])
    pq.write_table(result, out / "kept.parquet")
    return result.num_rows


def speed(rows: list[dict], work: pathlib.Path, models: pathlib.Path, repeats: int) -> dict:
    import torch

    torch.set_num_threads(2)
    images = write_dataset(rows, work / "data")
    config = bench_config(models, embedding_dedup=False, caption_filter=False)
    kept = {}
    sides = {"ours": lambda: kept.__setitem__("ours", ours(images, config, work / "ours")),
             "plain loop": lambda: kept.__setitem__("plain loop", plain_loop(images, config, work / "plain"))}
    samples = benchlib.interleaved(sides, repeats)
    result = {name: benchlib.summary(samples[name], len(rows)) for name in sides}
    result["ratio"] = benchlib.speed_ratio(result["ours"], result["plain loop"])
    result["kept"] = kept
    return result


# ---------------------------------------------------------------- 3. memory

def memory(rows_1x: list[dict], rows_10x: list[dict], work: pathlib.Path, models: pathlib.Path) -> dict:
    """Peak memory of each step's command on the 1x and the 10x set (same shard size)."""
    from memory import run_measured

    env = {**os.environ, "PYTHONPATH": str(benchlib.REPO)}
    config = bench_config(models)
    out = {}
    for scale, rows in (("1x", rows_1x), ("10x", rows_10x)):
        root = work / scale
        images = write_dataset(rows, root)
        steps = [("curate_keys", "components.curate.keys", {"images": images.uri}, root / "keys"),
                 ("curate_dedup", "components.curate.dedup", {"keys": str(root / "keys")}, root / "dedup"),
                 ("curate", "components.curate", {"images": images.uri, "keys": str(root / "keys"), "dedup": str(root / "dedup")}, root / "out")]
        for name, module, inputs, target in steps:
            argv = [sys.executable, "-m", module, "--config-json", config.to_json(), "--output", str(target)]
            for key, uri in inputs.items():
                argv += ["--input", f"{key}={uri}"]
            cpu = benchlib.cpu_seconds()
            measured = run_measured(argv, env, work / f"{scale}-{name}.log")
            measured["cpu_seconds"] = round(benchlib.cpu_seconds() - cpu, 2)
            out.setdefault(name, {})[scale] = {"rows": len(rows), **measured}
            print(f"  {name} {scale}: {measured}", file=sys.stderr)
    for name, sides in out.items():
        sides["ratio_process"] = round(sides["10x"]["max_process_mib"] / sides["1x"]["max_process_mib"], 3)
        sides["ratio_tree"] = round(sides["10x"]["tree_mib"] / sides["1x"]["tree_mib"], 3)
    return out


# ---------------------------------------------------------------- 4. the global pass alone, on synthetic keys

def synthetic_keys(root: pathlib.Path, rows: int, dim: int = 768, seed: int = 0) -> pathlib.Path:
    """curate_keys' dataset without images: random unit embeddings and hashes, 5 % of the rows near copies of an
    earlier row (cosine ~0.97, each pHash with one bit flipped or none), 1 % exact copies (same pixel hash)."""
    import pyarrow as pa

    from cnpipe.dataset import ShardedOutput, ShardResult
    from components.curate import keys

    rng = np.random.default_rng(seed)
    out = ShardedOutput(str(root), keys.DATASET, "bench", keys.KEYS_SCHEMA)
    names, shard_rows = [], 2048
    history_vectors, history_hashes, history_pixels = [], [], []
    for start in range(0, rows, shard_rows):
        n = min(shard_rows, rows - start)
        vectors = rng.standard_normal((n, dim)).astype(np.float32)
        hashes = rng.integers(0, 2**63, (n, 5), dtype=np.int64).astype(np.uint64)
        pixels = rng.integers(0, 2**63, n, dtype=np.int64).astype(np.uint64)
        if history_vectors:
            pool_v, pool_h, pool_p = np.concatenate(history_vectors), np.concatenate(history_hashes), np.concatenate(history_pixels)
            near = np.flatnonzero(rng.random(n) < 0.05)
            source = rng.integers(0, len(pool_v), len(near))
            noise = rng.standard_normal((len(near), dim)).astype(np.float32)
            noise /= np.linalg.norm(noise, axis=1, keepdims=True)
            vectors[near] = pool_v[source] * 0.97 + noise * 0.243
            flips = np.uint64(1) << rng.integers(0, 64, (len(near), 5)).astype(np.uint64)
            hashes[near] = pool_h[source] ^ np.where(rng.random((len(near), 5)) < 0.5, flips, np.uint64(0))
            exact = np.flatnonzero(rng.random(n) < 0.01)
            pixels[exact] = pool_p[rng.integers(0, len(pool_p), len(exact))]
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        keep = rng.random(n) < (20_000 / max(rows, 20_000))  # a bounded sample of earlier rows to copy from
        history_vectors.append(vectors[keep]), history_hashes.append(hashes[keep]), history_pixels.append(pixels[keep])
        table = pa.table({
            "id": [f"r{start + i:09d}" for i in range(n)], "seed": rng.random(n) < 0.05,
            "width": rng.integers(256, 1024, n).astype(np.int32), "height": rng.integers(256, 1024, n).astype(np.int32),
            "pixel_hash": pa.array(pixels, type=pa.uint64()),
            "phash": pa.array([list(map(int, h)) for h in hashes], type=pa.list_(pa.uint64())),
            "clip_embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), dim).cast(pa.list_(pa.float32())),
            "clip_similarity": pa.array(rng.uniform(0.1, 0.4, n).astype(np.float32)),
            "reason": pa.nulls(n, pa.string()), "detail": pa.nulls(n, pa.string())}, schema=keys.KEYS_SCHEMA)
        names.append(f"part-{start // shard_rows:06d}")
        out.commit(names[-1], ShardResult(table), rows_in=n)
    out.finalize(names, inputs=[])
    return root


def global_pass(work: pathlib.Path, sizes: list[int], models: pathlib.Path, index: str = "auto") -> dict:
    """curate_dedup's command on synthetic keys of `sizes` rows (production settings: 768-d, exact + pHash +
    embedding at 0.95, curate.embedding_index `index`), its peak memory and time, per million rows."""
    from memory import run_measured

    env = {**os.environ, "PYTHONPATH": str(benchlib.REPO)}
    config = bench_config(models, embedding_dedup=True, embedding_min_cosine=0.95, embedding_index=index)
    out = {}
    for rows in sizes:
        keys_root = synthetic_keys(work / f"keys-{rows}", rows)
        argv = [sys.executable, "-m", "components.curate.dedup", "--config-json", config.to_json(), "--output",
                str(work / f"dedup-{rows}"), "--input", f"keys={keys_root}"]
        cpu = benchlib.cpu_seconds()
        measured = run_measured(argv, env, work / f"dedup-{rows}.log")
        measured["cpu_seconds"] = round(benchlib.cpu_seconds() - cpu, 2)  # the command's, waited for: load-robust
        summary = json.loads((work / f"dedup-{rows}" / "summary.json").read_text())
        out[str(rows)] = {**measured, "index": summary["embedding_index"], "kept": summary["kept"],
                          "duplicate": summary["duplicate"], "near_duplicate": summary["near_duplicate"],
                          "keys_bytes": summary["keys_bytes"], "search_bytes": summary["search_bytes"],
                          "bytes_per_row": round((summary["keys_bytes"] + summary["search_bytes"]) / rows, 1),
                          "stage_seconds": summary["seconds"],
                          "seconds_per_million": round(sum(summary["seconds"].values()) * 1e6 / rows, 1),
                          "cpu_seconds_per_million": round(measured["cpu_seconds"] * 1e6 / rows, 1)}
        print(f"  global pass on {rows} synthetic rows: {out[str(rows)]}", file=sys.stderr)
        import shutil

        shutil.rmtree(keys_root, ignore_errors=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bases", type=int, default=240, help="originals in the 1x set")
    parser.add_argument("--scale", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--embedding-cosine", type=float, default=0.9999)
    parser.add_argument("--keys-rows", type=lambda t: [int(v) for v in t.split(",") if v], default=[25_000, 100_000],
                        help="sizes of the synthetic keys for the global pass alone, comma-separated (empty: skip)")
    parser.add_argument("--keys-index", default="auto",
                        help="curate.embedding_index for the global pass alone (e.g. IVF1024,PQ64: 64-byte codes)")
    parser.add_argument("--only", choices=["quality", "speed", "memory", "keys"], action="append")
    args = parser.parse_args()
    models = benchlib.ensure_tiny_models()
    parts = args.only or ["quality", "speed", "memory", "keys"]
    results: dict = {"settings": vars(args)}
    with tempfile.TemporaryDirectory(prefix="bench-curate-") as tmp:
        tmp = pathlib.Path(tmp)
        rows = generated_set(args.bases)
        if "quality" in parts:
            print("quality", file=sys.stderr)
            results["quality"] = quality(rows, tmp / "quality", models, args.embedding_cosine)
        if "speed" in parts:
            print("speed", file=sys.stderr)
            results["speed"] = speed(rows, tmp / "speed", models, args.repeats)
        if "memory" in parts:
            print("memory", file=sys.stderr)
            results["memory"] = memory(rows, generated_set(args.bases * args.scale, seed=1), tmp / "memory", models)
        if "keys" in parts and args.keys_rows:
            print("global pass", file=sys.stderr)
            results["global_pass"] = global_pass(tmp / "keys", args.keys_rows, models, args.keys_index)
    benchlib.write_result("curate", results, ("torch", "transformers", "faiss-cpu"))
    report(results)
    return 0


def report(results: dict) -> None:
    if "quality" in results:
        print("\nquality (precision / recall; recall per recipe)")
        recipes = RECIPES
        benchlib.print_table(["dedup signals", "precision", "recall", *recipes],
                             [[name, q["precision"], q["recall"], *[q["recipes"][r]["recall"] for r in recipes]]
                              for name, q in results["quality"].items()])
    if "speed" in results:
        s = results["speed"]
        print(f"\nspeed on {s['ours']['items']} images: ours {s['ours']['best_per_s']} img/s, plain loop "
              f"{s['plain loop']['best_per_s']} img/s; ratio best {s['ratio']['best']}, median {s['ratio']['median']}, "
              f"CPU {s['ratio']['cpu']}; kept {s['kept']}")
    if "memory" in results:
        print("\npeak memory (MiB)")
        benchlib.print_table(["step", "rows 1x / 10x", "process 1x", "process 10x", "tree 1x", "tree 10x", "ratio process / tree"],
                             [[n, f"{m['1x']['rows']} / {m['10x']['rows']}", m["1x"]["max_process_mib"], m["10x"]["max_process_mib"],
                               m["1x"]["tree_mib"], m["10x"]["tree_mib"], f"{m['ratio_process']} / {m['ratio_tree']}"]
                              for n, m in results["memory"].items()])
    if "global_pass" in results:
        print("\nglobal pass on synthetic keys (768-d)")
        benchlib.print_table(["rows", "index", "process MiB", "keys+search bytes/row", "wall s", "CPU s", "wall s per million",
                              "CPU s per million"],
                             [[rows, g["index"], g["max_process_mib"], g["bytes_per_row"], g["seconds"], g.get("cpu_seconds", "-"),
                               g["seconds_per_million"], g.get("cpu_seconds_per_million", "-")]
                              for rows, g in results["global_pass"].items()])


if __name__ == "__main__":
    sys.exit(main())
