"""SIGKILL `python -m components.laion_retrieval` after its first commit, rerun it, and get exactly the
uninterrupted result: URLs kept by the shards finished before the kill still count as seen (the same
duplicates are rejected), and no query of a finished shard is sent to the kNN service again."""
from __future__ import annotations

import json
import os
import subprocess
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_knn_protocol import INDICE, Service, tiny_clip, vectors  # noqa: F401  (module fixtures used here)

import pipeline_configs
from cnpipe.dataset import Manifest, ShardedOutput, ShardResult
from components.registry import stage_command
from components.laion_retrieval import index as knn_index
from tests.stage_kill import commit_markers, kill_after_commits

SHARDS, ROWS_PER_SHARD = 5, 3
SEEDS_SCHEMA = pa.schema([("id", pa.string()), ("clip_embedding", pa.list_(pa.float32()))])
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class SlowService(Service):
    """The kNN stand-in, answering each query after a pause, so that the stage can be killed between commits."""

    def __init__(self, folder: str, tiny_clip: str, delay_s: float):
        super().__init__(folder, tiny_clip, "threaded")  # the stand-in web server (slowed through its handler class)
        handler = self.server.RequestHandlerClass
        original = handler.do_POST

        def slow_post(request):
            time.sleep(delay_s)
            original(request)

        handler.do_POST = slow_post


@pytest.fixture
def slow_service(tmp_path, vectors, tiny_clip):  # noqa: F811
    folder = tmp_path / "knn-index"
    knn_index.build(vectors, [f"http://example.com/{i}.jpg" for i in range(len(vectors))],
                    [f"caption {i}" for i in range(len(vectors))], str(folder))
    service = SlowService(str(folder), tiny_clip, delay_s=0.15)
    yield service
    service.server.shutdown()
    service.server.server_close()


def seeds(tmp_path, vectors) -> Manifest:  # noqa: F811
    """Seed embeddings near a few index vectors each, so later shards find URLs earlier ones kept."""
    rng = np.random.default_rng(1)
    output = ShardedOutput(str(tmp_path / "embedded"), "clip_embed", "test", SEEDS_SCHEMA)
    names = []
    for shard in range(SHARDS):
        ids = [f"seed-{shard}-{row}" for row in range(ROWS_PER_SHARD)]
        embeddings = [(vectors[rng.integers(len(vectors))] + 0.3 * rng.normal(size=vectors.shape[1])).astype(np.float32).tolist()
                      for _ in ids]
        names.append(f"part-{shard:05d}")
        output.commit(names[-1], ShardResult(pa.table({"id": ids, "clip_embedding": embeddings}, schema=SEEDS_SCHEMA)), len(ids))
    return output.finalize(names, inputs=[])


def env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))}


def queried_embeddings(service, start: int = 0) -> list[tuple]:
    return [tuple(np.round(b["embedding_input"], 5)) for b in service.bodies[start:]]


def test_sigkilled_retrieval_resumes_to_the_uninterrupted_result(tmp_path, slow_service, vectors):  # noqa: F811
    config = pipeline_configs.embedded("/unused")
    retrieval = config.retrieval
    retrieval.service_url, retrieval.indice_name = slow_service.url + "/knn-service", INDICE
    retrieval.prompts, retrieval.num_images, retrieval.retries, retrieval.timeout_s = [], 4, 0, 30.0
    source = seeds(tmp_path, vectors)
    out = tmp_path / "resumed"
    argv = stage_command("laion_retrieval", config.to_json(), {"embedded": source.uri}, str(out))

    kill_after_commits(argv, env(), [out])
    before = commit_markers(out)
    assert 1 <= len(before) < SHARDS and not (out / "manifest.json").exists()

    done = subprocess.run(argv, env=env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    after = commit_markers(out)
    assert {name: after[name] for name in before} == before, "shards committed before the kill were redone"
    asked = queried_embeddings(slow_service)
    finished_first = [name.removesuffix(".json") for name in before]
    for shard in finished_first:
        table = pq.read_table(tmp_path / "embedded" / "data" / f"{shard.removeprefix('seeds-')}.parquet")
        for embedding in table.column("clip_embedding").to_pylist():
            assert asked.count(tuple(np.round(embedding, 5))) == 1, f"a query of finished shard {shard} was sent again"

    reference = tmp_path / "uninterrupted"
    run = subprocess.run(stage_command("laion_retrieval", config.to_json(), {"embedded": source.uri}, str(reference)),
                         env=env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    resumed, expected = Manifest.load(str(out)), Manifest.load(str(reference))
    for field in ("config_hash", "schema", "shards", "rows_in", "rows_out", "rows_rejected", "rejections"):
        assert getattr(resumed, field) == getattr(expected, field), field
    assert resumed.rows_in == SHARDS * ROWS_PER_SHARD * 4 and resumed.rejections.get("duplicate_url", 0) > 0
    assert not {"malformed_result", "over_num_images"} & set(resumed.rejections)  # the stand-in speaks the protocol
    resumed_rows = pa.concat_tables([t for _, t in resumed.iter_shards()])
    urls = resumed_rows.column("url").to_pylist()
    assert len(urls) == len(set(urls))
    assert resumed_rows.equals(pa.concat_tables([t for _, t in expected.iter_shards()]))
    assert json.loads((out / "manifest.json").read_text())["rows_out"] == resumed.rows_out
