"""curate_keys: every row's compact keys and filter verdicts, shard by shard (in shard groups), no image bytes.

Per row: the decoded image's size, a 64-bit hash of its pixels, 64-bit pHashes of it and of its centred crops, its
CLIP image embedding, the CLIP cosine of its caption and image (`clip_similarity`), and the first per-row filter it
fails (`reason`, `detail`; null when it passes). Every row is kept here (rows in = rows out): the curate step
rejects them, once the global dedup pass has also spoken.

Embeddings are computed once: a seed row's comes from clip_embed's output (`embeddings` input, the shard that
download passed it through from), a downloaded row's is computed here with clip_embed's own model class. Images
are decoded and hashed on helper threads, a few batches ahead of the model, one batch in memory at a time.
"""
from __future__ import annotations

import functools
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa

from cnpipe import images, storage
from cnpipe.dataset import Manifest, ShardedOutput, ShardResult
from cnpipe.image_batches import prefetched, prepare_threads
from cnpipe.progress import bar
from cnpipe.stage import my_part, partial_output, shard_plan, written_shards
from components.curate import hashes, settings

STAGE = "curate_keys"
DATASET = "curate/keys"  # the manifest's stage name (a part of curate, like conditioning/canny)

KEYS_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("seed", pa.bool_()),  # from hub_load (the user's own data), not retrieved: kept over retrieved copies
    ("width", pa.int32()),  # of the decoded image (null: it did not decode)
    ("height", pa.int32()),
    ("pixel_hash", pa.uint64()),
    ("phash", pa.list_(pa.uint64())),  # the whole image, then each curate.phash_crop_scales crop
    ("clip_embedding", pa.list_(pa.float32())),
    ("clip_similarity", pa.float32()),  # caption vs image; null without a caption or an image
    ("reason", pa.string()),  # the first per-row filter the row fails, or its decoding's reason; null: it passes
    ("detail", pa.string()),
])


def is_seed(origin: str | None) -> bool:
    """download names retrieved rows' origin "retrieval"; every other origin (folder:, hf:, table:) is the user's data."""
    return origin is not None and origin != "retrieval"


def centre_crop(image, scale: float):
    if scale >= 1.0:
        return image
    w, h = image.size
    dx, dy = (w - w * scale) / 2, (h - h * scale) / 2
    return image.crop((round(dx), round(dy), round(w - dx), round(h - dy)))


def column(table: pa.Table, name: str, default=None) -> list:
    return table.column(name).to_pylist() if name in table.column_names else [default] * table.num_rows


def score_reason(value: float | None, limit: float, reason: str, name: str) -> tuple[str, str] | None:
    if value is not None and value > limit:
        return reason, f"{name} {value:.3f} > {limit:g}"
    return None


def _is_score(value) -> bool:
    return value is not None and value == value  # NaN: no score


def image_reason(width: int, height: int, cfg) -> tuple[str, str] | None:
    if not cfg.resolution_filter:
        return None
    if min(width, height) < cfg.min_side:
        return "low_resolution", f"{width}x{height}: shorter side < {cfg.min_side}"
    ratio = max(width, height) / max(1, min(width, height))
    if ratio > cfg.max_aspect_ratio:
        return "bad_aspect_ratio", f"{width}x{height}: aspect {ratio:.2f} > {cfg.max_aspect_ratio:g}"
    return None


class RowWork:
    """What a helper thread makes of one row: sizes, hashes, and the image itself until the model has embedded it."""

    __slots__ = ("row", "image", "width", "height", "pixel_hash", "phash", "reason", "detail")

    def __init__(self, row: int):
        self.row, self.image = row, None
        self.width = self.height = self.pixel_hash = self.phash = self.reason = self.detail = None


def decode_and_hash(row: int, blob: bytes | None, scales: list[float]) -> RowWork:
    work = RowWork(row)
    try:
        image = images.decode_rgb(blob)
    except images.ImageRejected as err:
        work.reason, work.detail = err.reason, err.detail
        return work
    work.image, (work.width, work.height) = image, image.size
    work.pixel_hash = hashes.pixel_hash(np.asarray(image))
    work.phash = [hashes.phash(centre_crop(image, s)) for s in scales]
    return work


def keys_shard(table: pa.Table, reused: dict[str, list], embedder, config, executor: ThreadPoolExecutor) -> ShardResult:
    """The keys of one shard. `reused`: id -> CLIP embedding already made by clip_embed (seed rows); `embedder()`
    gives the CLIP model (components.clip_embed.stage.ClipEmbedder), loaded on first use."""
    cfg = config.curate
    n = table.num_rows
    ids, blobs = table.column("id").to_pylist(), table.column("image").to_pylist()
    origins = column(table, "origin")
    scales = settings.crop_scales(config)
    notes: Counter = Counter()
    rows: list[RowWork | None] = [None] * n
    embeddings: list[list | None] = [None] * n

    model = embedder()  # here, not first in a helper thread

    def prepare(batch: list[int]):
        # conversions (CMYK, 16-bit, ...) were counted by the stage that first decoded the image, not again here
        works = [decode_and_hash(i, blobs[i], scales) for i in batch]
        todo = [w for w in works if w.image is not None and ids[w.row] not in reused]
        pixels = model.prepare([w.image for w in todo]) if todo else None
        return works, todo, pixels

    batches = [list(range(i, min(n, i + cfg.batch_size))) for i in range(0, n, cfg.batch_size)]
    threads = prepare_threads()
    for works, todo, pixels in prefetched(executor, prepare, batches, ahead=threads + 1):
        if todo:
            for w, vector in zip(todo, model.run(pixels)):
                embeddings[w.row] = vector.tolist()
        for w in works:
            if w.image is not None and embeddings[w.row] is None:
                embeddings[w.row] = reused[ids[w.row]]
            w.image = None  # nothing but the keys outlives the batch
            rows[w.row] = w
        notes["clip_embedding_computed"] += len(todo)
        notes["clip_embedding_reused"] += sum(1 for w in works if w.reason is None and ids[w.row] in reused)

    captions = judged_captions(table, settings.caption_source(config))
    similarity = caption_similarity(captions, embeddings, embedder, cfg.batch_size)
    notes["no_caption_to_score"] += sum(1 for w, c in zip(rows, captions) if w.reason is None and not c)

    watermark, unsafe = column(table, "pwatermark"), column(table, "punsafe")
    for i, w in enumerate(rows):
        if w.reason is not None:
            continue
        # a row without LAION's score (a seed, a back end that returns none) passes that filter: counted, not silent
        notes["no_pwatermark_score"] += cfg.watermark_filter and not _is_score(watermark[i])
        notes["no_punsafe_score"] += cfg.unsafe_filter and not _is_score(unsafe[i])
        verdict = (image_reason(w.width, w.height, cfg)
                   or (cfg.watermark_filter and score_reason(watermark[i], cfg.max_pwatermark, "watermarked", "pwatermark"))
                   or (cfg.unsafe_filter and score_reason(unsafe[i], cfg.max_punsafe, "unsafe", "punsafe"))
                   or (cfg.caption_filter and similarity[i] is not None and similarity[i] < cfg.min_clip_similarity
                       and ("low_clip_similarity", f"clip similarity {similarity[i]:.3f} < {cfg.min_clip_similarity:g}"))
                   or None)
        if verdict:
            w.reason, w.detail = verdict
    out = pa.table({
        "id": ids, "seed": [is_seed(o) for o in origins],
        "width": [w.width for w in rows], "height": [w.height for w in rows],
        "pixel_hash": [w.pixel_hash for w in rows], "phash": [w.phash for w in rows],
        "clip_embedding": embeddings, "clip_similarity": similarity,
        "reason": [w.reason for w in rows], "detail": [w.detail for w in rows],
    }, schema=KEYS_SCHEMA)
    return ShardResult(out, [], +notes)


def judged_captions(table: pa.Table, preference: str) -> list[str]:
    """The caption each row trains on (conditioning's rule, components.conditioning.stage.chosen_caption)."""
    from components.conditioning.stage import chosen_caption

    return [chosen_caption(s, b, preference).strip()
            for s, b in zip(column(table, "source_caption"), column(table, "blip_caption"))]


def caption_similarity(captions: list[str], embeddings: list, embedder, batch_size: int) -> list[float | None]:
    """CLIP cosine of each row's caption and image (both L2-normalised); None without either."""
    rows = [i for i, (c, e) in enumerate(zip(captions, embeddings)) if c and e is not None]
    out: list[float | None] = [None] * len(captions)
    for start in range(0, len(rows), batch_size):
        part = rows[start:start + batch_size]
        texts = embedder().embed_texts([captions[i] for i in part])
        for i, text in zip(part, texts):
            out[i] = float(np.dot(np.asarray(embeddings[i], dtype=np.float32), text))
    return out


def reused_embeddings(embeddings: Manifest | None, shard: str) -> dict[str, list]:
    """clip_embed's embeddings of the rows of `shard`: download passes seed shards through under the name
    `<clip_embed's stage>-<its shard>`, so the seed rows of one images shard are in one clip_embed shard."""
    if embeddings is None:
        return {}
    names = {s["name"] for s in embeddings.shards}
    prefix = f"{embeddings.stage}-"
    source = shard[len(prefix):] if shard.startswith(prefix) and shard[len(prefix):] in names else shard
    if source not in names:
        return {}
    table = storage.read_parquet(storage.join(embeddings.uri, "data", f"{source}.parquet"), columns=["id", "clip_embedding"])
    return {i: e for i, e in zip(table.column("id").to_pylist(), table.column("clip_embedding").to_pylist()) if e}


def run(config, inputs: dict[str, Manifest], output_uri: str) -> Manifest:
    settings.check_settings(config)
    images_in, embeddings = inputs["images"], inputs.get("embeddings")
    plan = shard_plan([images_in])
    mine = my_part(plan)
    output = ShardedOutput(output_uri, DATASET, settings.config_hash(config), KEYS_SCHEMA, written_shards(mine))
    todo = [p for p in mine if not output.is_done(p[0])]

    @functools.cache
    def embedder():  # loaded only when a shard is left to do
        from components.clip_embed.stage import ClipEmbedder

        return ClipEmbedder(config.clip_embed.model, config.curate.device)

    progress = bar(STAGE, total=sum(rows for *_, rows in todo))
    progress.set_postfix_str(f"{len(mine) - len(todo)}/{len(mine)} shards already done", refresh=False)
    unscored: Counter = Counter()
    with ThreadPoolExecutor(prepare_threads(), thread_name_prefix="curate-keys") as executor:
        for name, manifest, in_name, rows in todo:
            table = storage.read_parquet(storage.join(manifest.uri, "data", f"{in_name}.parquet"))
            result = keys_shard(table, reused_embeddings(embeddings, name), embedder, config, executor)
            unscored.update({k: result.notes[k] for k in ("no_pwatermark_score", "no_punsafe_score")})
            unscored["rows"] += result.table.num_rows - result.table.column("width").null_count  # decoded rows
            output.commit(name, result, rows_in=table.num_rows)
            progress.update(rows)
    progress.close()
    for score, on in (("pwatermark", config.curate.watermark_filter), ("punsafe", config.curate.unsafe_filter)):
        if on and unscored["rows"] and unscored[f"no_{score}_score"] == unscored["rows"]:
            print(f"{STAGE}: none of the {unscored['rows']} rows this task scored carries a {score} (seed rows, or a "
                  f"retrieval back end that returns none): its filter passed them all", file=sys.stderr)
    sources = [images_in.uri] + ([embeddings.uri] if embeddings is not None else [])
    return partial_output(output_uri, plan, mine) or output.finalize([p[0] for p in plan], inputs=sources)


if __name__ == "__main__":
    from cnpipe.cli import main

    sys.exit(main(STAGE, run))
