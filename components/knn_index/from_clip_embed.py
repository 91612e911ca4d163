"""Our own clip_embed output (embeddings of images the user owns) as clip-retrieval's embedding layout, so that one
build path serves both. Each shard becomes img_emb/img_emb_<k>.npy (float16, as clip-retrieval writes) and
metadata/metadata_<k>.parquet with url, caption (the source caption), image_path (where hub_load read it) and id.

A row needs a URL the download stage can fetch: its own `url` (a table of URLs), or, for a folder of images,
index.image_url_prefix + its path in the folder (e.g. https://storage.googleapis.com/my-bucket/images/).
Rows that hub_load passed on without an image (URL rows) have no embedding and are left out.
"""
from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cnpipe import storage
from cnpipe.dataset import ContractError, Manifest
from components.knn_index.layout import LayoutError

COLUMN = "clip_embedding"


def _manifest(source: str) -> Manifest:
    try:
        manifest = Manifest.load(source)
    except ContractError as err:
        raise LayoutError(f"{source} is not a finished clip_embed output: {err}") from None
    names = [f["name"] for f in manifest.schema]
    if COLUMN not in names:
        raise LayoutError(f"{source} ({manifest.stage}) has no {COLUMN} column: give the clip_embed stage's output")
    return manifest


def _urls(table: pa.Table, prefix: str) -> list[str | None]:
    urls = table["url"].to_pylist() if "url" in table.column_names else [None] * table.num_rows
    origins = table["origin"].to_pylist() if "origin" in table.column_names else [None] * table.num_rows
    out = []
    for url, origin in zip(urls, origins):
        if url:
            out.append(url)
        elif prefix and origin and origin.startswith("folder:"):
            out.append(prefix.rstrip("/") + "/" + origin[len("folder:"):].lstrip("/"))
        else:
            out.append(None)
    return out


def check(source: str, cfg) -> None:
    """Problems found from the ids, URLs and origins alone (not the vectors), before anything is written."""
    manifest = _manifest(source)
    if not manifest.shards or manifest.rows_out == 0:
        raise LayoutError(f"{source} holds no rows: nothing to index")
    missing, example = 0, ""
    for _, url in manifest.shard_urls():
        table = storage.read_parquet(url, columns=[c for c in ("url", "origin") if c in [f["name"] for f in manifest.schema]])
        for value, origin in zip(_urls(table, cfg.image_url_prefix), table["origin"].to_pylist() if "origin" in table.column_names else [None] * table.num_rows):
            if value is None:
                missing += 1
                example = example or str(origin)
    if missing:
        hint = ("set index.image_url_prefix to where these images are served (the URL of the folder hub_load read)"
                if example.startswith("folder:") else "these rows came with neither a URL nor a folder path")
        raise LayoutError(f"{source}: {missing} rows have no URL to index (e.g. {example}): {hint}")


def write_layout(source: str, out: str, cfg) -> int:
    """Write the layout under `out`, one shard at a time; returns the vectors written."""
    manifest = _manifest(source)
    dim, written, number = 0, 0, 0
    for name, url in manifest.shard_urls():
        table = storage.read_parquet(url)
        table = table.filter(pc.is_valid(table[COLUMN]))
        if table.num_rows == 0:
            continue
        lengths = pc.list_value_length(table[COLUMN]).to_numpy(zero_copy_only=False)
        dim = dim or int(lengths[0])
        if (lengths != dim).any():
            raise LayoutError(f"{url}: embeddings of {sorted(set(lengths.tolist()))} dimensions in one dataset (expected {dim})")
        vectors = np.asarray(pc.list_flatten(table[COLUMN]).to_numpy(zero_copy_only=False), dtype=np.float32)
        buffer = io.BytesIO()
        np.save(buffer, vectors.reshape(-1, dim).astype(np.float16))
        storage.write_bytes_atomic(storage.join(out, "img_emb", f"img_emb_{number}.npy"), buffer.getvalue())
        meta = pa.table({
            "url": _urls(table, cfg.image_url_prefix),
            "caption": table["source_caption"] if "source_caption" in table.column_names else pa.nulls(table.num_rows, pa.string()),
            "image_path": table["origin"] if "origin" in table.column_names else pa.nulls(table.num_rows, pa.string()),
            "id": table["id"],
        })
        sink = pa.BufferOutputStream()
        pq.write_table(meta, sink)
        storage.write_bytes_atomic(storage.join(out, "metadata", f"metadata_{number}.parquet"), sink.getvalue().to_pybytes())
        written += table.num_rows
        number += 1
    if not written:
        raise LayoutError(f"{source}: no row has an embedding (clip_embed found no image to embed)")
    return written
