"""Readers that turn each kind of source into a stream of raw records, without decoding images, plus the
source's fingerprint.

Ids come from the source location (or an id column), so reruns produce the same ids. Every file is read through
`guard` (inside the source's root, regular files, at most hub_load.max_file_bytes); a file it refuses becomes a
record with `refused` set, which the stage rejects, so rows in = rows out + rows rejected still holds.

The fingerprint says what the source holds now (a folder's listing, a table file's size and version, a dataset's
revision and `datasets`' hash of its data files): shards are cut by position in the source, so a resume is only
sound against the source the run started from (see stage.check_source).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Iterator

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from cnpipe import storage
from cnpipe.ids import stable_id
from components.hub_load import guard

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# what a listing says about a file's version, by store: GCS generation, S3/Azure etag, local mtime, memory:// created
_VERSION_KEYS = ("generation", "etag", "ETag", "mtime", "LastModified", "last_modified", "updated", "created")


@dataclasses.dataclass
class RawRecord:
    id: str
    origin: str
    image: bytes | None = None
    url: str | None = None
    caption: bytes | str | None = None
    refused: tuple[str, str] | None = None  # (reason, detail): the row's image was not read, the row is rejected
    caption_refused: str | None = None  # reason the caption file was not read: the caption is dropped, the image kept


@dataclasses.dataclass
class Source:
    fingerprint: dict  # JSON values only: it is stored beside the output and compared on resume
    records: Iterator[RawRecord]


def open_source(cfg) -> Source:
    if cfg.kind == "folder":
        return from_folder(cfg.source, cfg.max_file_bytes)
    if cfg.kind == "hf":
        return from_hf(cfg.source, cfg.split, cfg.streaming, cfg.image_column, cfg.caption_column, cfg.id_column,
                       revision=cfg.revision, allow_local_paths=cfg.allow_local_paths, max_file_bytes=cfg.max_file_bytes)
    if cfg.kind == "table":
        return from_table(cfg.source, cfg.url_column, cfg.caption_column, cfg.id_column)
    raise ValueError(f"hub_load.kind must be one of hf, folder, table; got {cfg.kind!r}")


def _version(info: dict) -> str:
    return next((str(info[k]) for k in _VERSION_KEYS if info.get(k) is not None), "")


def from_folder(root: str, max_file_bytes: int) -> Source:
    """Image files below `root`, sorted; a sidecar `<stem>.txt` is the caption.

    Ids and origins are paths relative to the root as fsspec normalises it, so `seeds`, `./seeds/` and
    `/abs/seeds` give the same ids. The one listing (`find(detail=True)`) gives the names, the sizes for the
    byte cap on object stores, and the fingerprint."""
    fs, base = storage.filesystem(root)
    if not fs.exists(base):
        raise FileNotFoundError(f"hub_load.source folder {root} does not exist")
    prefix = base.rstrip("/") + "/"
    listing = {p[len(prefix):]: (p, info.get("size"), _version(info))
               for p, info in fs.find(base, detail=True).items() if p.startswith(prefix)}
    names = sorted(n for n in listing if n.lower().endswith(IMAGE_SUFFIXES))
    sidecars = {n: s for n in names if (s := n.rsplit(".", 1)[0] + ".txt") in listing}

    digest, total = hashlib.sha256(), 0
    for name in names:
        for entry in (name, sidecars.get(name)):
            if entry is not None:
                digest.update(json.dumps([entry, *listing[entry][1:]]).encode() + b"\n")
                total += listing[entry][1] or 0
    fingerprint = {"kind": "folder", "images": len(names), "captions": len(sidecars), "bytes": total,
                   "listing_sha256": digest.hexdigest()}

    if guard.is_local(fs):
        real_root = os.path.realpath(base)

        def read(name: str) -> bytes:
            return guard.read_local(listing[name][0], real_root, max_file_bytes)
    else:
        def read(name: str) -> bytes:  # object stores have no symlinks; the listing's size is checked first
            return guard.read_object(fs, listing[name][0], listing[name][1], max_file_bytes)

    def records() -> Iterator[RawRecord]:
        for name in names:
            record = RawRecord(id=stable_id("folder", name), origin=f"folder:{name}")
            try:
                record.image = read(name)
            except guard.Refused as refused:
                record.refused = (refused.reason, refused.detail)
                yield record
                continue
            if name in sidecars:
                try:
                    record.caption = read(sidecars[name])
                except guard.Refused as refused:
                    record.caption_refused = refused.reason
            yield record

    return Source(fingerprint, records())


def hf_image(value, local_root: str | None, allow_local_paths: bool, max_file_bytes: int) -> bytes | None:
    """The bytes of an image cell: those stored in the row, or, for a struct that only names a file, that file
    when hub_load.allow_local_paths is set and it lies inside the dataset's own local folder (a relative path is
    taken from that folder). A published dataset chooses its paths: without this guard it could make us read a local
    token or an internal URL into our shards."""
    if isinstance(value, bytes):
        data = value
    elif isinstance(value, dict) and value.get("bytes") is not None:
        data = value["bytes"]
    elif isinstance(value, dict) and value.get("path"):
        path = str(value["path"])
        if not allow_local_paths:
            raise guard.Refused("image_path_refused", f"the row names a file ({path}) instead of holding its bytes; "
                                                      "hub_load.allow_local_paths is false")
        if guard.is_url(path):
            raise guard.Refused("image_path_refused", f"{path} is a URL; only files of the dataset's own local folder are read")
        if local_root is None:
            raise guard.Refused("image_path_refused", f"{path}: the dataset is not a local folder, so no path of it is read")
        return guard.read_local(os.path.join(local_root, path), local_root, max_file_bytes)
    else:
        return None
    if len(data) > max_file_bytes:
        raise guard.Refused("file_too_large", f"the image holds {len(data)} bytes, over hub_load.max_file_bytes = {max_file_bytes}")
    return data


def from_hf(name: str, split: str, streaming: bool, image_column: str, caption_column: str, id_column: str,
            revision: str = "", allow_local_paths: bool = False, max_file_bytes: int = 64 * 2**20) -> Source:
    """A `datasets` dataset, images taken as stored bytes (decode=False) so we decode them safely ourselves.

    What `load_dataset` does, through one builder: the builder resolves the revision once, so its `hash` (the
    hub commit, or for a local dataset a hash of its data files' names and mtimes) is the fingerprint of exactly
    what is read."""
    import datasets

    builder = datasets.load_dataset_builder(name, revision=revision or None)
    if streaming:
        dataset = builder.as_streaming_dataset(split=split)
    else:
        builder.download_and_prepare()
        dataset = builder.as_dataset(split=split)
    fingerprint = {"kind": "hf", "revision": revision, "datasets_hash": str(builder.hash), "config_id": str(builder.config_id)}
    features = dataset.features or {}
    if image_column in features and isinstance(features[image_column], datasets.Image):
        dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    local_root = os.path.realpath(name) if os.path.isdir(name) else None

    def records() -> Iterator[RawRecord]:
        for index, row in enumerate(dataset):
            row_id = str(row[id_column]) if id_column else stable_id("hf", name, split, index)
            record = RawRecord(id=row_id, origin=f"hf:{name}/{split}/{index}", caption=row.get(caption_column))
            try:
                record.image = hf_image(row.get(image_column), local_root, allow_local_paths, max_file_bytes)
            except guard.Refused as refused:
                record.refused = (refused.reason, refused.detail)
            yield record

    return Source(fingerprint, records())


def from_table(path: str, url_column: str, caption_column: str, id_column: str, batch_rows: int = 4096) -> Source:
    """A Parquet or CSV table of URLs and captions, read in batches. Captions stay bytes until checked."""
    fs, inner = storage.filesystem(path)
    info = fs.info(inner)
    fingerprint = {"kind": "table", "size": info.get("size"), "version": _version(info)}
    return Source(fingerprint, _table_records(fs, inner, path, url_column, caption_column, id_column, batch_rows))


def _table_records(fs, inner: str, path: str, url_column: str, caption_column: str, id_column: str,
                   batch_rows: int) -> Iterator[RawRecord]:
    with fs.open(inner, "rb") as f:
        if path.lower().endswith(".csv"):
            header = pacsv.open_csv(f).schema.names
            f.seek(0)
            types = {c: pa.binary() for c in (caption_column, url_column) if c in header}
            batches = pacsv.open_csv(f, convert_options=pacsv.ConvertOptions(column_types=types))
        else:
            batches = pq.ParquetFile(f).iter_batches(batch_size=batch_rows)
        index = 0
        for batch in batches:
            if url_column not in batch.schema.names:
                raise ValueError(f"{path} has no URL column {url_column!r}; columns: {batch.schema.names}")
            columns = batch.to_pydict()
            for i, url in enumerate(columns[url_column]):
                if isinstance(url, bytes):
                    url = url.decode("utf-8", "replace")
                row_id = str(columns[id_column][i]) if id_column else stable_id("url", url, index)
                caption = columns[caption_column][i] if caption_column in columns else None
                yield RawRecord(id=row_id, origin=f"table:{index}", url=url, caption=caption)
                index += 1
