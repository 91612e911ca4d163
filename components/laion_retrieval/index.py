"""Build a kNN index in the layout a clip-retrieval back end serves: a faiss inner-product index of
L2-normalised CLIP image embeddings, plus a metadata table (url, caption) aligned with it."""
from __future__ import annotations

import pathlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def build(embeddings: np.ndarray, urls: list[str], captions: list[str], folder: str) -> None:
    import faiss

    out = pathlib.Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    vectors = np.ascontiguousarray(embeddings, dtype=np.float32)
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    faiss.write_index(index, str(out / "image.index"))
    pq.write_table(pa.table({"url": urls, "caption": captions}), out / "metadata.parquet")


class KnnIndex:
    def __init__(self, folder: str):
        import faiss

        self.index = faiss.read_index(str(pathlib.Path(folder) / "image.index"))
        self.metadata = pq.read_table(pathlib.Path(folder) / "metadata.parquet").to_pydict()

    @property
    def dim(self) -> int:
        return self.index.d

    def search(self, query: np.ndarray, k: int) -> list[dict]:
        query = np.asarray(query, dtype=np.float32).reshape(1, -1)
        if query.shape[1] != self.dim:
            raise ValueError(f"query has {query.shape[1]} dimensions, the index {self.dim}")
        query = query / max(float(np.linalg.norm(query)), 1e-12)
        scores, ids = self.index.search(query, min(k, self.index.ntotal))
        return [
            {"id": int(i), "similarity": float(s), "url": self.metadata["url"][i], "caption": self.metadata["caption"][i]}
            for s, i in zip(scores[0], ids[0])
            if i >= 0
        ]
