"""clip-retrieval's `/knn-service` protocol end to end: a faiss index built by laion_retrieval.index, served on
loopback by knn_service's threaded server (the embedded stand-in) and by knn_aio's (serve-index), queried by
knn_client with the body ClipClient sends (text and embedding queries)."""
from __future__ import annotations

import io
import json
import pathlib
import socket

import numpy as np
import pytest
import requests

import pipeline_configs
from components.laion_retrieval import index as knn_index
from components.laion_retrieval import knn_aio, knn_service
from components.laion_retrieval.knn_client import KnnClient, KnnServiceError

INDICE = "test-index"
# The fields clip_retrieval.clip_client.ClipClient.query posts (clip-retrieval 2.44).
CLIP_CLIENT_FIELDS = {
    "text", "image", "image_url", "embedding_input", "deduplicate", "use_safety_model", "use_violence_detector",
    "indice_name", "use_mclip", "aesthetic_score", "aesthetic_weight", "modality", "num_images", "num_result_ids",
}


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> str:
    from cnpipe.embedded import tiny_models

    root = tmp_path_factory.getbasetemp() / "data-half-models"
    tiny_models.ensure(str(root))
    return str(root / "tiny-clip")


@pytest.fixture(scope="module")
def vectors(tiny_clip) -> np.ndarray:
    dim = json.loads((pathlib.Path(tiny_clip) / "config.json").read_text())["projection_dim"]
    rng = np.random.default_rng(0)
    raw = rng.normal(size=(12, dim)).astype(np.float32)
    return raw / np.linalg.norm(raw, axis=1, keepdims=True)


class Service:
    def __init__(self, folder: str, tiny_clip: str, server: str):
        self.bodies: list[dict] = []
        self.text_embedder = knn_service.ClipTextEmbedder(tiny_clip)
        indices = {INDICE: knn_index.KnnIndex(folder)}
        service = self
        if server == "aiohttp":
            api = knn_service.KnnApi(indices, self.text_embedder)
            parse = api.parse

            def recording(path, body):
                service.bodies.append(json.loads(body))
                return parse(path, body)

            api.parse = recording
            self.server = knn_aio.serve(api)
        else:
            base = knn_service.make_handler(indices, self.text_embedder)

            class Recording(base):
                def do_POST(self):
                    body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                    service.bodies.append(json.loads(body))
                    self.rfile = io.BytesIO(body)
                    super().do_POST()

            self.server = knn_service.serve(Recording)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def stop(self) -> None:
        self.server.shutdown()
        if hasattr(self.server, "server_close"):
            self.server.server_close()


@pytest.fixture(scope="module", params=["threaded", "aiohttp"])
def service(request, tmp_path_factory, vectors, tiny_clip):
    folder = tmp_path_factory.mktemp("knn-index")
    knn_index.build(vectors, [f"http://example.com/{i}.jpg" for i in range(len(vectors))],
                    [f"caption {i}" for i in range(len(vectors))], str(folder))
    running = Service(str(folder), tiny_clip, request.param)
    yield running
    running.stop()


def client(service, **retrieval) -> KnnClient:
    cfg = pipeline_configs.embedded("/unused").retrieval
    cfg.indice_name, cfg.retries, cfg.timeout_s = INDICE, 0, 10.0
    for key, value in retrieval.items():
        setattr(cfg, key, value)
    return KnnClient(service.url + "/knn-service", cfg)


def expected_order(vectors: np.ndarray, query: np.ndarray) -> list[int]:
    query = query / np.linalg.norm(query)
    return [int(i) for i in np.argsort(-(vectors @ query), kind="stable")]


def test_index_files_are_clip_retrieval_layout(tmp_path, vectors):
    knn_index.build(vectors[:3], ["u0", "u1", "u2"], ["c0", "c1", "c2"], str(tmp_path / "idx"))
    # clip-retrieval back's folder (--use_arrow): image.index, and metadata/ whose Arrow files, in name order, hold row i
    assert sorted(p.name for p in (tmp_path / "idx").iterdir()) == ["image.index", "metadata"]
    assert [p.name for p in (tmp_path / "idx" / "metadata").iterdir()] == ["metadata_00000.arrow"]
    loaded = knn_index.KnnIndex(str(tmp_path / "idx"))
    assert loaded.dim == vectors.shape[1] and loaded.index.ntotal == 3
    with pytest.raises(ValueError, match="dimensions"):
        loaded.search(np.ones(vectors.shape[1] + 1), 1)


def test_embedding_query_returns_nearest_first(service, vectors):
    query = vectors[5] + 0.1 * vectors[2]  # not normalised: the service normalises
    results = client(service, num_images=4).query(embedding=query.tolist())
    assert len(results) == 4
    assert [r["id"] for r in results] == expected_order(vectors, query)[:4]
    assert results[0]["id"] == 5 and results[0]["url"] == "http://example.com/5.jpg" and results[0]["caption"] == "caption 5"
    similarities = [r["similarity"] for r in results]
    assert similarities == sorted(similarities, reverse=True)
    np.testing.assert_allclose(similarities, (vectors @ (query / np.linalg.norm(query)))[[r["id"] for r in results]], atol=1e-5)


def test_text_query_is_embedded_by_the_service_and_ranked(service, vectors):
    text = "a photo of an astronaut"
    results = client(service, num_images=5).query(text=text)
    text_vector = service.text_embedder(text)
    assert [r["id"] for r in results] == expected_order(vectors, text_vector)[:5]


def test_request_body_is_what_clip_client_sends(service):
    kept = len(service.bodies)
    client(service, num_images=3, aesthetic_score=7, aesthetic_weight=0.25, use_safety_model=False).query(text="a cat")
    (body,) = service.bodies[kept:]
    assert set(body) == CLIP_CLIENT_FIELDS
    assert body["text"] == "a cat" and body["embedding_input"] is None and body["image"] is None and body["image_url"] is None
    assert body["indice_name"] == INDICE and body["modality"] == "image" and body["use_mclip"] is False
    assert (body["num_images"], body["num_result_ids"]) == (3, 3)
    assert (body["aesthetic_score"], body["aesthetic_weight"], body["use_safety_model"]) == (7, 0.25, False)


@pytest.mark.parametrize("num_images, expected", [(1, 1), (7, 7), (50, 12)])
def test_num_images_is_honoured(service, vectors, num_images, expected):
    assert len(client(service, num_images=num_images).query(embedding=vectors[0].tolist())) == expected


def test_unknown_indice_is_a_clear_error(service, vectors):
    with pytest.raises(KnnServiceError) as err:
        client(service, indice_name="laion5B-L-14").query(embedding=vectors[0].tolist())
    assert "unknown indice_name 'laion5B-L-14'" in str(err.value) and INDICE in str(err.value)


def test_bad_queries_are_clear_errors(service, vectors):
    with pytest.raises(KnnServiceError, match="dimensions"):
        client(service).query(embedding=[0.1, 0.2])
    with pytest.raises(KnnServiceError, match="give text or embedding_input"):
        client(service).query()


def test_indices_list(service):
    assert requests.get(service.url + "/indices-list", timeout=10).json() == [INDICE]


def test_unreachable_service_fails_after_its_retries(vectors):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = pipeline_configs.embedded("/unused").retrieval
    cfg.retries, cfg.timeout_s = 0, 2.0
    with pytest.raises(KnnServiceError, match="failed after 1 tries"):
        KnnClient(f"http://127.0.0.1:{port}/knn-service", cfg).query(embedding=vectors[0].tolist())
    with pytest.raises(KnnServiceError, match="service_url is empty"):
        KnnClient("", cfg)


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "::"])
def test_serve_refuses_non_loopback_hosts(host):
    handler = knn_service.make_handler({}, lambda text: None)
    with pytest.raises(ValueError, match="allow_public_bind"):
        knn_service.serve(handler, host=host)
    with pytest.raises(ValueError, match="allow_public_bind"):
        knn_aio.serve(knn_service.KnnApi({}, lambda text: None), host=host)


def test_serve_binds_a_public_host_only_when_allowed():
    handler = knn_service.make_handler({}, lambda text: None)
    server = knn_service.serve(handler, host="0.0.0.0", allow_public_bind=True)
    try:
        port = server.server_address[1]
        assert requests.get(f"http://127.0.0.1:{port}/indices-list", timeout=10).json() == []
    finally:
        server.shutdown()
        server.server_close()
