"""LAION's pwatermark and punsafe travel from the kNN service through laion_retrieval and download to the image rows
curate filters: the real stages, in-process, against a loopback /knn-service and a loopback web. Rows the service
gave no score, seed rows and rows of a retrieval output without the columns carry null."""
from __future__ import annotations

import json

import pyarrow as pa
import pytest

from components.download import stage as download
from components.laion_retrieval import stage as retrieval
from tests.core.knn_server import KnnServer, empty_seeds
from tests.core.knn_server import config as retrieval_config
from tests.download.test_download_stage import config, isolated_guard, seed_jpeg, seeds, write_dataset  # noqa: F401


@pytest.fixture
def knn():
    running = KnnServer()
    yield running
    running.close()


def test_scores_reach_the_image_rows_and_are_null_where_absent(tmp_path, web, knn, isolated_guard):
    results = [
        {"id": 1, "url": web.url("/photo/marked.jpg"), "caption": "a", "similarity": 0.9, "pwatermark": 0.9, "punsafe": 0.01},
        {"id": 2, "url": web.url("/photo/unsafe.jpg"), "caption": "b", "similarity": 0.8, "pwatermark": 0.1, "punsafe": 0.75},
        {"id": 3, "url": web.url("/photo/plain.jpg"), "caption": "c", "similarity": 0.7},
        {"id": 4, "url": web.url("/missing.jpg"), "caption": "d", "similarity": 0.6, "pwatermark": 0.2, "punsafe": 0.2},
    ]
    body = json.dumps(results).encode()
    knn.answer = lambda handler: knn.send_raw(handler, body)
    retrieved = retrieval.run(retrieval_config(knn.url), {"seeds": empty_seeds(tmp_path)}, str(tmp_path / "retrieved"))
    older = write_dataset(str(tmp_path / "older"), "laion_retrieval", pa.table(  # retrieved before scores were kept
        {"id": ["older"], "url": [web.url("/photo/older.jpg")], "source_caption": ["e"], "similarity": [0.5], "query": ["q"]}))

    inputs = {"retrieved": retrieved, "older": older, "seeds": seeds(tmp_path, seed_jpeg())}
    manifest = download.run(config(allowed_networks=["127.0.0.1/32"]), inputs, str(tmp_path / "out"))

    assert manifest.rows_in == 6 == manifest.rows_out + manifest.rows_rejected
    assert manifest.rejections == {"http_404": 1}
    assert manifest.arrow_schema().field("pwatermark").type == pa.float32() == manifest.arrow_schema().field("punsafe").type
    got = {r["url"].rsplit("/", 1)[1] if r["url"] else r["id"]: (r["pwatermark"], r["punsafe"])
           for _, t in manifest.iter_shards() for r in t.to_pylist()}
    assert got == {"marked.jpg": (pytest.approx(0.9), pytest.approx(0.01)), "unsafe.jpg": (pytest.approx(0.1), pytest.approx(0.75)),
                   "plain.jpg": (None, None), "older.jpg": (None, None), "seed-with-image": (None, None)}

