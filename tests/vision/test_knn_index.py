"""Issue 16: an index built with autofaiss (the index family's environment) from clip-retrieval's embedding layout or a
clip_embed output, served memory-mapped by knn_service with clip-retrieval's API, and the laion_retrieval stage
retrieving the planted neighbours through it; bad embedding sets refused before any work."""
from __future__ import annotations

import io
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
from cnpipe.dataset import Manifest, ShardedOutput, ShardResult
from cnpipe.families import REPO_ROOT
from components.knn_index import driver, layout, synthetic
from components.laion_retrieval import index as knn_index
from components.laion_retrieval import knn_service, stage

DIM, COUNT, QUERIES, NEIGHBOURS = 64, 20_000, 12, 40
INDICE = "own"
SEEDS_SCHEMA = pa.schema([("id", pa.string()), ("clip_embedding", pa.list_(pa.float32()))])


def index_python() -> str:
    driver.ensure_index_environment()  # .venvs/index from envs/index.lock.txt (a no-op once made)
    return str(REPO_ROOT / ".venvs" / "index" / "bin" / "python")


def build(source: str, output: str, **index) -> subprocess.CompletedProcess:
    """`python -m components.knn_index.build` in the index family's interpreter, as `pipeline.py index` runs it."""
    config = pipeline_configs.embedded("/unused")
    config.index = pipeline_configs.IndexConfig(source=source, output=output,
                                                **{"max_index_memory_usage": "64MB", "current_memory_available": "1G", **index})
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run([index_python(), "-m", "components.knn_index.build", "--config-json", config.to_json()],
                          capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=600)


@pytest.fixture(scope="module")
def planted_set(tmp_path_factory) -> pathlib.Path:
    root = tmp_path_factory.mktemp("embeddings")
    synthetic.generate(str(root), COUNT, dim=DIM, queries=QUERIES, neighbours=NEIGHBOURS, rows_per_file=4_000)
    return root


@pytest.fixture(scope="module")
def built(planted_set, tmp_path_factory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("index")
    done = build(str(planted_set), str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_autofaiss_builds_a_memory_mappable_index_with_aligned_metadata(built, planted_set):
    summary = json.loads((built / "index.json").read_text())
    assert summary["count"] == COUNT and summary["dim"] == DIM
    assert summary["index_key"].startswith("IVF") and summary["index_param"].startswith("nprobe=")
    assert summary["within_budget"] and summary["peak_rss_bytes"] > 0
    assert [s["first_id"] for s in summary["sources"]] == [0, 4000, 8000, 12000, 16000]
    index = knn_index.KnnIndex(str(built))
    import faiss

    lists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(index.index).invlists)
    assert isinstance(lists, faiss.OnDiskInvertedLists), type(lists)  # read from the mapped file, not copied to RAM
    # metadata row i describes vector i, across file boundaries (the files sort as autofaiss reads them)
    planted = synthetic.load_npy(str(planted_set / "planted.npy"))
    rows = index.metadata.take(pa.array(planted[:, 0])).to_pylist()
    assert [r["caption"] for r in rows] == [f"planted neighbour 0 of query {q}" for q in range(QUERIES)]
    assert [r["url"] for r in rows] == [f"https://images.example.com/synthetic/{i}.jpg" for i in planted[:, 0]]


@pytest.fixture(scope="module")
def service(built):
    server = knn_service.serve(knn_service.make_handler({INDICE: knn_index.KnnIndex(str(built))}, lambda text: None))
    yield f"http://127.0.0.1:{server.server_address[1]}/knn-service"
    server.shutdown()
    server.server_close()


def test_retrieval_stage_gets_the_planted_neighbours_through_the_service(service, planted_set, tmp_path):
    queries = synthetic.load_npy(str(planted_set / "queries.npy"))
    planted = synthetic.load_npy(str(planted_set / "planted.npy"))
    seeds = ShardedOutput(str(tmp_path / "seeds"), "clip_embed", "test", SEEDS_SCHEMA)
    ids = [f"q{q}" for q in range(QUERIES)]
    seeds.commit("part-00000", ShardResult(pa.table({"id": ids, "clip_embedding": [v.tolist() for v in queries]},
                                                    schema=SEEDS_SCHEMA)), QUERIES)
    config = pipeline_configs.embedded("/unused")
    r = config.retrieval
    r.service_url, r.indice_name, r.prompts, r.num_images, r.retries = service, INDICE, [], NEIGHBOURS, 0
    manifest = stage.run(config, {"seeds": seeds.finalize(["part-00000"], inputs=[])}, str(tmp_path / "retrieved"))
    table = pa.concat_tables(t for _, t in manifest.iter_shards()).to_pydict()
    got = {(query, url) for query, url in zip(table["query"], table["url"])}
    want = {(f"seed:q{q}", f"https://images.example.com/synthetic/{i}.jpg") for q in range(QUERIES) for i in planted[q]}
    assert len(got & want) / len(want) >= 0.9  # in 64 dimensions a few background rows come as close as planted ones
    vectors = np.concatenate([synthetic.load_npy(str(p)) for p in sorted((planted_set / "img_emb").glob("*.npy"))])
    exact = np.argsort(-(queries @ vectors.astype(np.float32).T), axis=1)[:, :NEIGHBOURS]  # the rows sort as built
    truth = {(f"seed:q{q}", f"https://images.example.com/synthetic/{i}.jpg") for q in range(QUERIES) for i in exact[q]}
    assert len(got & truth) / len(truth) >= 0.95  # recall@40 against exact search
    assert manifest.rows_in == QUERIES * NEIGHBOURS
    assert sum(c.startswith("planted neighbour") for c in table["source_caption"]) >= 0.9 * len(want)


def test_clip_retrieval_body_and_answer(service):
    """The answer is clip-retrieval back's: a list of {url, caption, id, similarity}, at most num_images of them,
    best first; a text query on a service without a text model is refused with a message, not a crash."""
    import requests

    vector = np.zeros(DIM, np.float32)
    vector[0] = 1
    body = {"text": None, "image": None, "image_url": None, "embedding_input": vector.tolist(), "deduplicate": True,
            "use_safety_model": False, "use_violence_detector": False, "indice_name": INDICE, "use_mclip": False,
            "aesthetic_score": 9, "aesthetic_weight": 0.5, "modality": "image", "num_images": 7, "num_result_ids": 7}
    answer = requests.post(service, json=body, timeout=30).json()
    assert len(answer) == 7 and {"url", "caption", "id", "similarity"} <= set(answer[0])
    assert [a["similarity"] for a in answer] == sorted((a["similarity"] for a in answer), reverse=True)
    assert requests.get(service.replace("/knn-service", "/indices-list"), timeout=10).json() == [INDICE]


def _npy(path: pathlib.Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    np.save(buffer, array)
    path.write_bytes(buffer.getvalue())


def _meta(path: pathlib.Path, rows: int, **columns) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns or {"url": [f"http://x/{i}.jpg" for i in range(rows)], "caption": ["c"] * rows}), path)


def _unit(rows: int, dim: int = 8, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(rows, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _good(root: pathlib.Path) -> pathlib.Path:
    for k in range(3):
        _npy(root / "img_emb" / f"img_emb_{k}.npy", _unit(50, seed=k))
        _meta(root / "metadata" / f"metadata_{k}.parquet", 50)
    return root


BAD_SETS = {
    "dimension mismatch": (lambda r: _npy(r / "img_emb" / "img_emb_1.npy", _unit(50, dim=9)), "dimension 9, but"),
    "metadata not aligned": (lambda r: _meta(r / "metadata" / "metadata_2.parquet", 49), "49 metadata rows for 50 vectors"),
    "missing metadata": (lambda r: (r / "metadata" / "metadata_0.parquet").unlink(), "no metadata file beside it"),
    "missing embeddings": (lambda r: (r / "img_emb" / "img_emb_2.npy").unlink(), "metadata with no embeddings file"),
    "empty file": (lambda r: _npy(r / "img_emb" / "img_emb_1.npy", np.zeros((0, 8), np.float32)), "empty (0 vectors)"),
    "zero-byte file": (lambda r: (r / "img_emb" / "img_emb_1.npy").write_bytes(b""), "not a .npy file (empty)"),
    "not normalised": (lambda r: _npy(r / "img_emb" / "img_emb_0.npy", 3 * _unit(50)), "are not unit length"),
    "no url column": (lambda r: _meta(r / "metadata" / "metadata_0.parquet", 50, link=["x"] * 50), "no 'url' column"),
    "mixed dtypes": (lambda r: _npy(r / "img_emb" / "img_emb_2.npy", _unit(50, seed=2).astype(np.float16)), "dtype <f2"),
}


@pytest.mark.parametrize("case", sorted(BAD_SETS))
def test_bad_embedding_sets_are_refused_with_the_file_and_the_reason(tmp_path, case):
    spoil, message = BAD_SETS[case]
    root = _good(tmp_path / "set")
    layout.check(str(root))  # the good set passes
    spoil(root)
    with pytest.raises(layout.LayoutError, match=message.replace("(", r"\(").replace(")", r"\)")):
        layout.check(str(root))


def test_no_embeddings_at_all(tmp_path):
    with pytest.raises(layout.LayoutError, match="no embeddings at"):
        layout.check(str(tmp_path))


def test_build_refuses_before_any_work(tmp_path):
    """The build command fails in seconds with every problem named, and writes nothing where the index goes."""
    root = _good(tmp_path / "set")
    _npy(root / "img_emb" / "img_emb_1.npy", 2 * _unit(50, dim=9))  # wrong dimension
    _meta(root / "metadata" / "metadata_2.parquet", 10)  # not aligned
    out = tmp_path / "index"
    done = build(str(root), str(out))
    assert done.returncode == 2
    assert "img_emb_1.npy: dimension 9" in done.stderr and "10 metadata rows for 50 vectors" in done.stderr
    assert "Traceback" not in done.stderr
    assert not out.exists() or not any(out.iterdir())


def test_own_images_from_a_clip_embed_output(tmp_path):
    """clip_embed rows of a folder source: refused without index.image_url_prefix (they have no URL), indexed with
    it; rows without an embedding (URL rows) are left out."""
    schema = pa.schema([("id", pa.string()), ("url", pa.string()), ("source_caption", pa.string()),
                        ("origin", pa.string()), ("clip_embedding", pa.list_(pa.float32()))])
    vectors = _unit(30, dim=16, seed=5)
    output = ShardedOutput(str(tmp_path / "clip_embed"), "clip_embed", "test", schema)
    for shard in range(2):
        rows = range(shard * 15, shard * 15 + 15)
        table = pa.table({"id": [f"id{i}" for i in rows], "url": [None] * 15, "source_caption": [f"mine {i}" for i in rows],
                          "origin": [f"folder:photos/{i}.jpg" for i in rows],
                          "clip_embedding": [vectors[i].tolist() if i != 3 else None for i in rows]}, schema=schema)
        output.commit(f"part-{shard:05d}", ShardResult(table), 15)
    manifest: Manifest = output.finalize(["part-00000", "part-00001"], inputs=[])
    refused = build(manifest.uri, str(tmp_path / "refused"))
    assert refused.returncode == 2 and "set index.image_url_prefix" in refused.stderr and "folder:photos/" in refused.stderr
    done = build(manifest.uri, str(tmp_path / "index"), image_url_prefix="https://cdn.example.com/me/")
    assert done.returncode == 0, done.stderr[-3000:]
    index = knn_index.KnnIndex(str(tmp_path / "index"))
    assert index.index.ntotal == 29
    best = index.search(vectors[20], 1)[0]
    assert best["url"] == "https://cdn.example.com/me/photos/20.jpg" and best["caption"] == "mine 20"
    assert best["similarity"] == pytest.approx(1.0, abs=2e-3)  # float16 storage, as clip-retrieval writes


def test_an_index_on_an_object_store_is_copied_then_served(built, tmp_path):
    """serve-index on a bucket's index: copied to the local volume (memory mapping needs a file), index.json last
    so a half copy is redone; a second start keeps the files that are already whole."""
    from cnpipe import storage
    from components.knn_index import serve

    remote = "memory://bucket/knn-index"
    for path in sorted(p for p in built.rglob("*") if p.is_file()):
        storage.write_bytes_atomic(f"{remote}/{path.relative_to(built)}", path.read_bytes())
    local = serve.local_copy(remote, str(tmp_path / "volume"), INDICE)
    index = knn_index.KnnIndex(local)
    assert index.index.ntotal == COUNT and (pathlib.Path(local) / "index.json").exists()
    mtime = (pathlib.Path(local) / "image.index").stat().st_mtime_ns
    assert serve.local_copy(remote, str(tmp_path / "volume"), INDICE) == local
    assert (pathlib.Path(local) / "image.index").stat().st_mtime_ns == mtime


def test_serve_command_answers_once_loaded_and_stops_on_sigterm(built, tmp_path):
    import signal

    import requests

    ready = tmp_path / "ready.json"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    process = subprocess.Popen([str(REPO_ROOT / ".venvs" / "vision" / "bin" / "python"), "-m", "components.knn_index.serve",
                                "--index", f"{INDICE}={built}", "--port", "0", "--ready-file", str(ready)],
                               env=env, cwd=REPO_ROOT, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(600):
            if ready.exists() or process.poll() is not None:
                break
            time.sleep(0.1)
        url = json.loads(ready.read_text())["knn_url"]
        assert requests.get(url.replace("/knn-service", "/indices-list"), timeout=10).json() == [INDICE]
        refused = requests.post(url, json={"text": "a cat", "indice_name": INDICE, "num_images": 3, "modality": "image"},
                                timeout=10)
        assert refused.status_code == 400 and "no text model" in refused.json()["error"]
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    assert f"{INDICE}: {COUNT} vectors of dimension {DIM}" in process.stderr.read()


def test_new_search_settings_retune_without_training_again(planted_set, tmp_path):
    """Only the query-time budget changed: autofaiss's tune_index sets nprobe on the built index (no new training)."""
    import shutil

    out = tmp_path / "index"
    assert build(str(planted_set), str(out)).returncode == 0
    first = json.loads((out / "index.json").read_text())
    mtime = (out / "metadata" / "metadata_00000.arrow").stat().st_mtime_ns
    again = build(str(planted_set), str(out), max_index_query_time_ms=0.05)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "re-tuned" in again.stderr and "Training the index" not in again.stderr
    summary = json.loads((out / "index.json").read_text())
    assert summary["search_settings"]["max_index_query_time_ms"] == 0.05 and "retune_seconds" in summary
    assert summary["build_seconds"] == first["build_seconds"]  # the build's own record is kept
    assert (out / "metadata" / "metadata_00000.arrow").stat().st_mtime_ns == mtime
    index = knn_index.KnnIndex(str(out))
    import faiss

    assert summary["index_param"] == f"nprobe={faiss.extract_index_ivf(index.index).nprobe}"
    assert int(summary["index_param"].split("=")[1]) <= int(first["index_param"].split("=")[1])
    shutil.rmtree(out)
