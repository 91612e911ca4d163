"""A kNN index in the folder layout a clip-retrieval back end serves, and its reader.

    <folder>/image.index                faiss inner-product index of L2-normalised CLIP image embeddings
    <folder>/metadata/*.arrow           Arrow IPC files (url, caption, ...): row i of their concatenation, in
                                        sorted name order, describes vector i (clip-retrieval's `--use_arrow`)
    <folder>/metadata.parquet           the same, as one Parquet file (small indexes of earlier versions)

`build` makes a small exact (flat) index in-process, for the embedded stand-in and tests; an index at scale is
built with autofaiss by components/knn_index/build.py into the same layout. `KnnIndex` reads either one memory-mapped:
the faiss file with IO_FLAG_MMAP (an IVF index keeps only its coarse quantizer in RAM; its inverted lists stay in
the file and are paged in as queries touch them) and the Arrow metadata through pyarrow memory maps (a query reads
the rows of its results, not the table). `clip-retrieval back --enable_faiss_memory_mapping True --use_arrow True`
serves the same folder.
"""
from __future__ import annotations

import pathlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

INDEX_FILE = "image.index"
METADATA_DIR = "metadata"


def build(embeddings: np.ndarray, urls: list[str], captions: list[str], folder: str) -> None:
    """An exact index of `embeddings` (normalised here) with url and caption per row."""
    import faiss

    out = pathlib.Path(folder)
    (out / METADATA_DIR).mkdir(parents=True, exist_ok=True)
    vectors = np.ascontiguousarray(embeddings, dtype=np.float32)
    if vectors.ndim != 2 or len(vectors) != len(urls) or len(urls) != len(captions):
        raise ValueError(f"{vectors.shape} vectors for {len(urls)} urls and {len(captions)} captions: one of each per row")
    vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    table = pa.table({"url": pa.array(urls, pa.string()), "caption": pa.array(captions, pa.string())})
    with pa.OSFile(str(out / METADATA_DIR / "metadata_00000.arrow"), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    faiss.write_index(index, str(out / INDEX_FILE))  # last: a folder with image.index is a whole index


def _metadata(folder: pathlib.Path) -> pa.Table:
    """The metadata table, memory-mapped where it is Arrow (zero copy: nothing is read until a row is taken)."""
    arrow_dir = folder / METADATA_DIR
    if arrow_dir.is_dir():
        files = sorted(p for p in arrow_dir.rglob("*") if p.is_file() and not p.name.startswith("."))
        if not files:
            raise FileNotFoundError(f"{arrow_dir} holds no metadata files")
        tables = [pa.ipc.open_file(pa.memory_map(str(p), "r")).read_all() for p in files]
        return pa.concat_tables(tables) if len(tables) > 1 else tables[0]
    return pq.read_table(folder / "metadata.parquet", memory_map=True)


class KnnIndex:
    """An index folder, read memory-mapped; thread-safe for concurrent searches."""

    def __init__(self, folder: str, mmap: bool = True):
        import faiss

        self.folder = pathlib.Path(folder)
        flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap else 0
        self.index = faiss.read_index(str(self.folder / INDEX_FILE), flags)
        self.metadata = _metadata(self.folder)
        if self.metadata.num_rows != self.index.ntotal:
            raise ValueError(f"{self.folder}: {self.metadata.num_rows} metadata rows for {self.index.ntotal} vectors: "
                             "row i of the metadata must describe vector i")
        self.columns = [c for c in self.metadata.column_names if c not in ("id", "similarity")]
        # the record batches (zero-copy views of the mapped files) and the first row of each: a row is read from its
        # own batch, as Table.take's per-call cost grows with the batches (4 ms for 40 rows of 20 batches)
        self.batches = [batch.select(self.columns) for batch in self.metadata.to_batches()]
        self.starts = np.cumsum([0] + [batch.num_rows for batch in self.batches])

    @property
    def dim(self) -> int:
        return self.index.d

    @property
    def index_bytes(self) -> int:
        return (self.folder / INDEX_FILE).stat().st_size

    def prepare(self, query) -> np.ndarray:
        """One query as the index takes it (float32, unit length), or a ValueError saying what is wrong with it."""
        query = np.asarray(query, dtype=np.float32).reshape(-1)
        if query.shape[0] != self.dim:
            raise ValueError(f"query has {query.shape[0]} dimensions, the index {self.dim}")
        if not np.isfinite(query).all():
            raise ValueError("query holds a NaN or infinite value")
        return query / max(float(np.linalg.norm(query)), 1e-12)

    def search(self, query: np.ndarray, k: int) -> list[dict]:
        return self.search_batch(self.prepare(query).reshape(1, -1), [k])[0]

    def search_batch(self, queries: np.ndarray, ks: list[int]) -> list[list[dict]]:
        """Prepared queries searched in one faiss call, their rows read in one metadata take: per query, far
        cheaper than one call each (faiss splits a batch over its threads)."""
        ks = [max(1, int(k)) for k in ks]
        k = min(max(ks), self.index.ntotal)
        scores, ids = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        found = [[(float(s), int(i)) for s, i in zip(row_s[:want], row_i[:want]) if i >= 0]
                 for row_s, row_i, want in zip(scores, ids, ks)]
        rows = iter(self.rows([i for hits in found for _, i in hits]))
        return [[{**next(rows), "id": i, "similarity": s} for s, i in hits] for hits in found]

    def rows(self, ids: list[int]) -> list[dict]:
        """The metadata rows of `ids`, in their order: one take from each record batch they fall in."""
        ids = np.asarray(ids, dtype=np.int64)
        which = np.searchsorted(self.starts, ids, side="right") - 1
        rows: list = [None] * len(ids)
        for batch in np.unique(which):
            at = np.flatnonzero(which == batch)
            taken = self.batches[batch].take(pa.array(ids[at] - self.starts[batch])).to_pylist()
            for position, row in zip(at, taken):
                rows[position] = row
        return rows
