"""Readers that turn each kind of source into a stream of raw records, without decoding images.

Ids come from the source location (or an id column), so reruns produce the same ids.
"""
from __future__ import annotations

import dataclasses
from typing import Iterator

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from cnpipe import storage
from cnpipe.ids import stable_id

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


@dataclasses.dataclass
class RawRecord:
    id: str
    origin: str
    image: bytes | None = None
    url: str | None = None
    caption: bytes | str | None = None


def from_folder(root: str) -> Iterator[RawRecord]:
    """Image files below `root`, sorted; a sidecar `<stem>.txt` is the caption."""
    if not storage.exists(root):
        raise FileNotFoundError(f"hub_load.source folder {root} does not exist")
    files = list(storage.iter_files(root))
    present = set(files)
    for url in files:
        if not url.lower().endswith(IMAGE_SUFFIXES):
            continue
        relative = url[len(root.rstrip("/")) + 1 :] if url.startswith(root.rstrip("/")) else url
        sidecar = url.rsplit(".", 1)[0] + ".txt"
        yield RawRecord(
            id=stable_id("folder", relative),
            origin=f"folder:{relative}",
            image=storage.read_bytes(url),
            caption=storage.read_bytes(sidecar) if sidecar in present else None,
        )


def from_hf(name: str, split: str, streaming: bool, image_column: str, caption_column: str, id_column: str) -> Iterator[RawRecord]:
    """A `datasets` dataset, images taken as stored bytes (decode=False) so we decode them safely ourselves."""
    import datasets

    dataset = datasets.load_dataset(name, split=split, streaming=streaming)
    features = dataset.features or {}
    if image_column in features and isinstance(features[image_column], datasets.Image):
        dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    for index, row in enumerate(dataset):
        value = row.get(image_column)
        image = value.get("bytes") if isinstance(value, dict) else value if isinstance(value, bytes) else None
        if image is None and isinstance(value, dict) and value.get("path"):
            image = storage.read_bytes(value["path"])
        row_id = str(row[id_column]) if id_column else stable_id("hf", name, split, index)
        yield RawRecord(id=row_id, origin=f"hf:{name}/{split}/{index}", image=image, caption=row.get(caption_column))


def from_table(path: str, url_column: str, caption_column: str, id_column: str, batch_rows: int = 4096) -> Iterator[RawRecord]:
    """A Parquet or CSV table of URLs and captions, read in batches. Captions stay bytes until checked."""
    fs, inner = storage.filesystem(path)
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
