"""A generated embedding set in clip-retrieval's `clip inference` layout, with planted neighbours.

    <out>/img_emb/img_emb_<k>.npy          float16 (as clip-retrieval writes them), L2-normalised, rows × dim
    <out>/metadata/metadata_<k>.parquet    url, caption: one row per vector, in the same order
    <out>/queries.npy                      float32 queries × dim
    <out>/planted.npy                      int64 queries × neighbours: the global row ids planted near each query

The vectors are not uniform noise (an IVF index would have no structure to use): they come from a mixture of
`count // 2000` clusters, each point at cosine ~0.6 from its cluster's centre (~0.36 between two points of a
cluster), as CLIP embeddings of one domain cluster. Each query sits in a cluster like the data, and its planted
neighbours are at cosine 0.65-0.95 from it, spread so that their order matters, at random rows of random files.
Exact search finds the planted rows as the query's top neighbours (a few background rows may come close): recall is
measured against exact search, the planted ids are what an end-to-end test can expect back.

    python -m components.knn_index.synthetic OUT --count 1000000 [--dim 768] [--queries 100] [--neighbours 40]
"""
from __future__ import annotations

import argparse
import io
import pathlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cnpipe import storage

CENTRE_COSINE = 0.6  # a point's cosine to its cluster's centre
PLANTED_COSINE = (0.65, 0.95)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _around(centres: np.ndarray, cosine: float, rng: np.random.Generator) -> np.ndarray:
    """Unit vectors at about `cosine` from each of `centres` (one per row)."""
    noise = _unit(rng.standard_normal(centres.shape, dtype=np.float32))
    spread = np.sqrt(1.0 / cosine**2 - 1.0)
    return _unit(centres + spread * noise)


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def generate(out: str, count: int, dim: int = 768, queries: int = 100, neighbours: int = 40,
             rows_per_file: int = 50_000, seed: int = 0, url_prefix: str = "https://images.example.com/synthetic/") -> dict:
    """Write the set under `out` (local or gs://), one file of at most `rows_per_file` rows at a time."""
    if count < queries * neighbours:
        raise ValueError(f"count={count} cannot hold {queries} queries × {neighbours} planted neighbours")
    rng = np.random.default_rng(seed)
    clusters = max(4, count // 2000)
    centres = _unit(rng.standard_normal((clusters, dim), dtype=np.float32))
    query_vectors = _around(centres[rng.integers(0, clusters, queries)], CENTRE_COSINE, rng).astype(np.float32)
    planted = rng.choice(count, size=(queries, neighbours), replace=False).astype(np.int64)
    planted_at = {int(row): (q, n) for q, rows in enumerate(planted) for n, row in enumerate(rows)}
    cosines = np.linspace(PLANTED_COSINE[1], PLANTED_COSINE[0], neighbours, dtype=np.float32)
    files = 0
    for start in range(0, count, rows_per_file):
        rows = min(rows_per_file, count - start)
        block = _around(centres[rng.integers(0, clusters, rows)], CENTRE_COSINE, rng)
        ids = np.arange(start, start + rows)
        captions = [f"synthetic image {i}" for i in ids]
        mine = [(i - start, *planted_at[i]) for i in ids if i in planted_at]
        if mine:
            local, q, n = (np.array(v) for v in zip(*mine))
            block[local] = _around_query(query_vectors[q], cosines[n], rng)
            for i, qq, nn in mine:
                captions[i] = f"planted neighbour {nn} of query {qq}"
        storage.write_bytes_atomic(storage.join(out, "img_emb", f"img_emb_{files}.npy"), _npy_bytes(block.astype(np.float16)))
        table = pa.table({"url": [f"{url_prefix}{i}.jpg" for i in ids], "caption": captions})
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        storage.write_bytes_atomic(storage.join(out, "metadata", f"metadata_{files}.parquet"), sink.getvalue().to_pybytes())
        files += 1
    storage.write_bytes_atomic(storage.join(out, "queries.npy"), _npy_bytes(query_vectors))
    storage.write_bytes_atomic(storage.join(out, "planted.npy"), _npy_bytes(planted))
    return {"count": count, "dim": dim, "files": files, "queries": queries, "neighbours": neighbours}


def _around_query(query: np.ndarray, cosine: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Unit vectors at exactly `cosine` (per row) from each query row: the query plus an orthogonal unit part."""
    noise = rng.standard_normal(query.shape, dtype=np.float32)
    noise = _unit(noise - (noise * query).sum(-1, keepdims=True) * query)
    return _unit(cosine[:, None] * query + np.sqrt(1 - cosine[:, None] ** 2) * noise)


def load_npy(url: str) -> np.ndarray:
    return np.load(io.BytesIO(storage.read_bytes(url)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out")
    parser.add_argument("--count", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--neighbours", type=int, default=40)
    parser.add_argument("--rows-per-file", type=int, default=50_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    pathlib.Path(args.out).mkdir(parents=True, exist_ok=True) if "://" not in args.out else None
    info = generate(args.out, args.count, args.dim, args.queries, args.neighbours, args.rows_per_file, args.seed)
    print(f"wrote {info['count']} vectors of dimension {info['dim']} in {info['files']} files, "
          f"{info['queries']} queries with {info['neighbours']} planted neighbours each, under {args.out}")


if __name__ == "__main__":
    main()
