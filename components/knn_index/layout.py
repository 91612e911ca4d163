"""clip-retrieval's embedding layout, read and checked before an index is built.

`clip-retrieval inference` (and the released LAION embeddings) write, under one folder (local or gs://):

    img_emb/img_emb_<k>.npy          float16 or float32, rows × dim, L2-normalised CLIP image embeddings
    metadata/metadata_<k>.parquet    one row per embedding, in the same order: url, caption, ...

autofaiss reads every `img_emb/**/*.npy` in sorted path order and numbers the vectors in that order, so the index's
row ids are positions in that concatenation; the metadata files are paired with the embedding files by their number
<k> and taken in the same order, which is what keeps metadata row i on vector i.

Everything here reads headers and footers plus a sample of rows per file: a bad set fails in seconds, before
a build that takes hours, with every problem named at once.
"""
from __future__ import annotations

import ast
import dataclasses
import re

import numpy as np
import pyarrow.parquet as pq

from cnpipe import storage

EMBEDDINGS = "img_emb"
METADATA = "metadata"
DTYPES = ("<f2", "<f4")
_NUMBER = re.compile(r"(\d+)(?=\.[^.]+$)")


class LayoutError(ValueError):
    """The embedding set cannot be indexed as it is; the message names each file and what is wrong with it."""


@dataclasses.dataclass
class EmbeddingFile:
    embeddings: str  # URL of the .npy
    metadata: str  # URL of its .parquet
    rows: int
    dim: int
    dtype: str
    header_bytes: int  # where the rows start in the .npy


@dataclasses.dataclass
class Layout:
    source: str
    files: list[EmbeddingFile]

    @property
    def count(self) -> int:
        return sum(f.rows for f in self.files)

    @property
    def dim(self) -> int:
        return self.files[0].dim

    @property
    def embeddings_folder(self) -> str:
        return storage.join(self.source, EMBEDDINGS)


def _glob(folder: str, suffix: str) -> list[str]:
    """Every file under `folder` ending in `suffix`, as URLs, sorted as autofaiss's embedding reader sorts them."""
    fs, path = storage.filesystem(folder)
    if not fs.exists(path):
        return []
    protocol = folder.split("://", 1)[0] + "://" if "://" in folder else ""
    found = sorted(fs.glob(path.rstrip("/") + f"/**/*{suffix}"))
    return [protocol + p if protocol and not p.startswith(protocol) else p for p in found]


def read_npy_header(url: str) -> tuple[tuple[int, ...], str, bool, int]:
    """(shape, dtype, fortran order, header length in bytes) from the first bytes of a .npy, local or remote."""
    fs, path = storage.filesystem(url)
    with fs.open(path, "rb") as f:
        head = f.read(10)
        if len(head) < 10 or head[:6] != b"\x93NUMPY":
            raise LayoutError(f"{url}: not a .npy file ({'empty' if not head else 'no NUMPY magic'})")
        major = head[6]
        if major == 1:
            length, start = int.from_bytes(head[8:10], "little"), 10
        else:
            length, start = int.from_bytes(head[8:10] + f.read(2), "little"), 12
        header = ast.literal_eval(f.read(length).decode("latin1"))
    return tuple(header["shape"]), np.dtype(header["descr"]).str, bool(header["fortran_order"]), start + length


def read_rows(file: EmbeddingFile, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of one embedding file, as float32, reading only their bytes."""
    itemsize = np.dtype(file.dtype).itemsize * file.dim
    fs, path = storage.filesystem(file.embeddings)
    with fs.open(path, "rb") as f:
        f.seek(file.header_bytes + start * itemsize)
        data = f.read((stop - start) * itemsize)
    return np.frombuffer(data, dtype=file.dtype).reshape(-1, file.dim).astype(np.float32)


def _number(url: str) -> str | None:
    match = _NUMBER.search(url.rsplit("/", 1)[-1])
    return match.group(1).lstrip("0") or "0" if match else None


def pair_files(source: str) -> tuple[list[tuple[str, str | None]], list[str]]:
    """[(embedding file, its metadata file or None)] in autofaiss's order, and the metadata files left unpaired."""
    embeddings = _glob(storage.join(source, EMBEDDINGS), ".npy")
    metadata = _glob(storage.join(source, METADATA), ".parquet")
    by_number: dict[str, str] = {}
    for url in metadata:
        key = _number(url) or url.rsplit("/", 1)[-1].rsplit(".", 1)[0]
        by_number.setdefault(key, url)
    pairs = []
    for url in embeddings:
        key = _number(url) or url.rsplit("/", 1)[-1].rsplit(".", 1)[0]
        pairs.append((url, by_number.pop(key, None)))
    return pairs, sorted(by_number.values())


def check(source: str, *, url_column: str = "url", expect_dim: int = 0, check_rows: int = 1024,
          norm_tolerance: float = 0.01) -> Layout:
    """The set at `source`, or a LayoutError naming every problem: no embeddings, a file with no metadata (or
    metadata with no embeddings), an empty file, a dimension or dtype that differs from the first file's (or from
    `expect_dim`), metadata whose row count differs from its vectors', no `url_column`, vectors that are not unit
    length (the first and last check_rows/2 rows of every file are read)."""
    pairs, orphans = pair_files(source)
    if not pairs:
        raise LayoutError(f"no embeddings at {source}: expected clip-retrieval's layout, {EMBEDDINGS}/*.npy with "
                          f"{METADATA}/*.parquet beside it (or a clip_embed output: set index.source_kind=clip_embed)")
    problems = [f"{url}: metadata with no embeddings file of the same number" for url in orphans]
    files: list[EmbeddingFile] = []
    for emb, meta in pairs:
        try:
            shape, dtype, fortran, header = read_npy_header(emb)
        except LayoutError as err:
            problems.append(str(err))
            continue
        if len(shape) != 2 or fortran or dtype not in DTYPES:
            problems.append(f"{emb}: shape {shape}, dtype {dtype}{', Fortran order' if fortran else ''}: expected rows × dim "
                            "float16 or float32 in C order")
            continue
        if shape[0] == 0:
            problems.append(f"{emb}: empty (0 vectors)")
            continue
        if meta is None:
            problems.append(f"{emb}: no metadata file beside it ({METADATA}/ holds no .parquet with its number)")
            continue
        try:
            fs, path = storage.filesystem(meta)
            with fs.open(path, "rb") as f:
                parquet = pq.ParquetFile(f)
                rows, names = parquet.metadata.num_rows, parquet.schema_arrow.names
        except Exception as err:  # noqa: BLE001 - any unreadable file is a problem to name, not a crash
            problems.append(f"{meta}: not a readable Parquet file ({type(err).__name__}: {err})")
            continue
        if rows != shape[0]:
            problems.append(f"{meta}: {rows} metadata rows for {shape[0]} vectors in {emb}: metadata row i must describe "
                            "vector i")
        if url_column not in names:
            problems.append(f"{meta}: no {url_column!r} column (columns: {', '.join(names)})")
        files.append(EmbeddingFile(emb, meta, shape[0], shape[1], dtype, header))
    if files:
        first = files[0]
        want_dim = expect_dim or first.dim
        for file in files:
            if file.dim != want_dim:
                told = f"index.dim={expect_dim}" if expect_dim else f"{first.embeddings} ({first.dim})"
                problems.append(f"{file.embeddings}: dimension {file.dim}, but {told}")
            elif file.dtype != first.dtype:
                problems.append(f"{file.embeddings}: dtype {file.dtype}, but {first.embeddings} is {first.dtype} "
                                "(autofaiss reads every file with the first one's dtype)")
        if not problems:
            problems += _norm_problems(files, check_rows, norm_tolerance)
    if problems:
        raise LayoutError(f"cannot index {source}:\n  " + "\n  ".join(problems))
    return Layout(source, files)


def _norm_problems(files: list[EmbeddingFile], check_rows: int, tolerance: float) -> list[str]:
    problems = []
    for file in files:
        half = max(1, check_rows // 2)
        spans = [(0, min(half, file.rows))]
        if file.rows > half:
            spans.append((max(half, file.rows - half), file.rows))
        norms = np.concatenate([np.linalg.norm(read_rows(file, a, b), axis=1) for a, b in spans])
        bad = np.abs(norms - 1.0) > tolerance
        if bad.any():
            problems.append(f"{file.embeddings}: {int(bad.sum())} of {len(norms)} vectors read are not unit length "
                            f"(norms {norms.min():.3g} to {norms.max():.3g}): the index uses inner product, which is cosine "
                            "similarity only on L2-normalised vectors; normalise them (x / ||x||) before indexing")
    return problems
