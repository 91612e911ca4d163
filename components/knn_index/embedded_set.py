"""The embedded-own-index preset's generated embedding set, in clip-retrieval's layout: the embedded pool's images
embedded by the pipeline's own (tiny) CLIP, with the URLs the embedded web serves them at, plus generated distractor
vectors so that autofaiss has an index to choose (IVF over 20 000 vectors, not a flat list of 40). A distractor is a
random unit vector turned away from the pool's images (a seed image's neighbours stay the pool's own embeddings) at
one of the pool's URLs (a text query of the untrained tiny CLIP lands anywhere: what it retrieves still downloads,
and the retrieval stage keeps each URL once, as it does for the many rows a web index holds per image).
Runs in the vision family's environment.

    python -m components.knn_index.embedded_set ASSETS CLIP_MODEL OUT [--web-port 48721] [--distractors 20000]
"""
from __future__ import annotations

import argparse
import io
import json
import pathlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cnpipe import storage

WEB_PORT = 48721  # orchestration.local_run.EMBEDDED_WEB_PORT: where the embedded web serves the pool


def _write(out: str, number: int, vectors: np.ndarray, urls: list[str], captions: list[str]) -> None:
    buffer = io.BytesIO()
    np.save(buffer, vectors.astype(np.float16))
    storage.write_bytes_atomic(storage.join(out, "img_emb", f"img_emb_{number}.npy"), buffer.getvalue())
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"url": urls, "caption": captions}), sink)
    storage.write_bytes_atomic(storage.join(out, "metadata", f"metadata_{number}.parquet"), sink.getvalue().to_pybytes())


def generate(assets: str, clip_model: str, out: str, web_port: int = WEB_PORT, distractors: int = 20_000, seed: int = 0) -> int:
    from PIL import Image

    from components.clip_embed.stage import ClipImageEmbedder

    pool = pathlib.Path(assets) / "pool"
    entries = json.loads((pool / "index.json").read_text())
    vectors = np.asarray(ClipImageEmbedder(clip_model, "cpu")([Image.open(pool / e["embed"]).convert("RGB") for e in entries]))
    base = f"http://127.0.0.1:{web_port}/images/"
    _write(out, 0, vectors, [base + e["path"] for e in entries], [e["caption"] for e in entries])
    rng = np.random.default_rng(seed)
    mean = vectors.mean(axis=0)
    noise = rng.standard_normal((distractors, vectors.shape[1])).astype(np.float32)
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    noise *= -np.sign(noise @ mean)[:, None]  # every distractor faces away from the pool: never a better answer
    picks = [entries[i % len(entries)] for i in range(distractors)]
    _write(out, 1, noise, [base + e["path"] for e in picks], [e["caption"] for e in picks])
    return len(entries) + distractors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("assets")
    parser.add_argument("clip_model")
    parser.add_argument("out")
    parser.add_argument("--web-port", type=int, default=WEB_PORT)
    parser.add_argument("--distractors", type=int, default=20_000)
    args = parser.parse_args()
    count = generate(args.assets, args.clip_model, args.out, args.web_port, args.distractors)
    print(f"wrote {count} embeddings in clip-retrieval's layout under {args.out}")


if __name__ == "__main__":
    main()
