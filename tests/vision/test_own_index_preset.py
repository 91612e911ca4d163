"""The embedded-own-index preset's retrieval, without a second whole-pipeline run: `pipeline.py index`'s build for the
preset (the embedded pool embedded by the tiny CLIP plus distractors, indexed by autofaiss in the index family),
served by serve-index's own command (aiohttp, memory-mapped, the preset's text model), and the laion_retrieval stage
with the preset's settings retrieving from it: every pool image's own URL, from its embedding, and the prompts too."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import pipeline_configs
from cnpipe.dataset import ShardedOutput, ShardResult
from cnpipe.families import REPO_ROOT
from components.knn_index import driver
from components.laion_retrieval import stage

SEEDS_SCHEMA = pa.schema([("id", pa.string()), ("clip_embedding", pa.list_(pa.float32()))])


@pytest.fixture(scope="module")
def preset(tmp_path_factory):
    config = pipeline_configs.embedded_own_index(str(tmp_path_factory.mktemp("assets")))
    config.index.port = 0  # any free port (the ready file names it)
    assert driver.build(config) == 0  # what `python pipeline.py index --preset embedded-own-index` runs
    return config


@pytest.fixture(scope="module")
def served(preset, tmp_path_factory):
    ready = tmp_path_factory.mktemp("serve") / "ready.json"
    process = subprocess.Popen(driver.serve_command(preset) + ["--ready-file", str(ready)], cwd=REPO_ROOT,
                               env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    deadline = time.time() + 300
    while not ready.exists():
        assert process.poll() is None and time.time() < deadline, "serve-index did not start"
        time.sleep(0.2)
    yield json.loads(ready.read_text())["knn_url"]
    process.terminate()
    process.wait(timeout=30)


def test_the_preset_retrieves_the_pool_from_the_index_it_built(preset, served, tmp_path):
    index = json.loads((pathlib.Path(preset.index.output) / "index.json").read_text())
    assert index["index_key"].startswith("IVF") or ",IVF" in index["index_key"]  # autofaiss's, not a flat list
    source = preset.index.source
    vectors = np.load(f"{source}/img_emb/img_emb_0.npy").astype(np.float32)  # the pool's own embeddings
    urls = pq.read_table(f"{source}/metadata/metadata_0.parquet")["url"].to_pylist()
    seeds = ShardedOutput(str(tmp_path / "seeds"), "clip_embed", "test", SEEDS_SCHEMA)
    ids = [f"pool{i}" for i in range(len(vectors))]
    seeds.commit("part-00000", ShardResult(pa.table({"id": ids, "clip_embedding": [v.tolist() for v in vectors]},
                                                    schema=SEEDS_SCHEMA)), len(ids))
    config = preset
    config.retrieval.service_url = served
    manifest = stage.run(config, {"seeds": seeds.finalize(["part-00000"], inputs=[])}, str(tmp_path / "retrieved"))
    table = pa.concat_tables(t for _, t in manifest.iter_shards()).to_pydict()
    got = set(table["url"])
    # each pool image's nearest vector is its own (the distractors face away from the pool), so every pool URL comes
    # back; the stage keeps a URL once, so which seed's query it is listed under may differ
    assert set(urls) <= got, sorted(set(urls) - got)
    assert max(table["similarity"]) > 0.99
    assert any(q.startswith("prompt:") for q in table["query"])  # text queries embedded by the served CLIP
    assert manifest.rows_in == (len(ids) + len(config.retrieval.prompts)) * config.retrieval.num_images
