"""Serve a kNN index over clip-retrieval's HTTP API (`POST /knn-service`, `GET /indices-list`).

We serve the API ourselves instead of running `clip-retrieval back`: clip-retrieval 2.45 pins numpy<2, pyarrow<16,
torch, torchvision, open-clip-torch, sentence-transformers, wandb and img2dataset, which cannot share an environment
with the rest (every family is on numpy 2), and at start it loads its CLIP model through all_clip, from the internet;
we need the pipeline's own CLIP model (any transformers CLIP, tiny ones included) to embed text queries.
The index folders we serve are clip-retrieval back's own (`--enable_faiss_memory_mapping True --use_arrow True`):
bench/knn_clip_back.py installs clip-retrieval 2.45.0 in a throwaway environment and drives its loading and query
code (load_index, ArrowMetadataProvider, KnnService.query) over a folder `pipeline.py index` built: the same ids and
URLs as here. Binds loopback unless told otherwise (a pod: --allow-public-bind).

KnnApi answers the routes; SearchBatcher searches concurrent queries together. The threaded server here serves the
embedded stand-in (orchestration/local_web.py extends its handler); `serve-index` serves on aiohttp (knn_aio.py).
"""
from __future__ import annotations

import ipaddress
import json
import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from components.laion_retrieval.index import KnnIndex


class ClipTextEmbedder:
    def __init__(self, model_id: str):
        import torch
        from transformers import CLIPModel, CLIPTokenizer

        from cnpipe.torch_models import load_pretrained

        self.torch = torch
        self.model = load_pretrained(CLIPModel, model_id).eval()
        self.tokenizer = CLIPTokenizer.from_pretrained(model_id)

    def __call__(self, text: str):
        with self.torch.inference_mode():
            tokens = self.tokenizer([text], padding=True, truncation=True, return_tensors="pt",
                                    max_length=self.model.config.text_config.max_position_embeddings)
            return self.model.get_text_features(**tokens)[0].numpy()


class SearchBatcher:
    """Searches of one index from concurrent requests, made by one thread in batches of whatever is waiting: one
    faiss call and one metadata read per batch cost far less per query than one each, and faiss's threads (set in
    that thread: OpenMP's count is per thread) never oversubscribe the cores. No waiting to fill a batch: a lone
    query is searched at once. faiss releases the GIL, so the request threads parse and answer meanwhile."""

    def __init__(self, index: KnnIndex, threads: int = 1, max_batch: int = 64):
        self.index, self.threads, self.max_batch = index, max(1, threads), max_batch
        self.pending: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._run, daemon=True, name="knn-search").start()

    def submit(self, query, k: int) -> Future:
        """The future rows of `query`'s k nearest; a bad query raises ValueError here, in its own request."""
        future: Future = Future()
        self.pending.put((self.index.prepare(query), int(k), future))
        return future

    def _run(self) -> None:
        import faiss
        import numpy as np

        faiss.omp_set_num_threads(self.threads)
        while True:
            batch = [self.pending.get()]
            while len(batch) < self.max_batch:
                try:
                    batch.append(self.pending.get_nowait())
                except queue.Empty:
                    break
            try:
                answers = self.index.search_batch(np.stack([q for q, _, _ in batch]), [k for _, k, _ in batch])
            except Exception as err:  # noqa: BLE001 - every waiting request gets the error, the thread goes on
                for _, _, future in batch:
                    future.set_exception(err)
                continue
            for (_, _, future), answer in zip(batch, answers):
                future.set_result(answer)


@dataclass
class Search:
    """A parsed `POST /knn-service`: what to search, before the (blocking) text embedding and search."""
    searcher: SearchBatcher
    embedding: object  # None for a text query
    text: str
    k: int
    n: int


class KnnApi:
    """clip-retrieval back's two routes over `indices`, apart from the HTTP server: the threaded one below (the
    embedded stand-in, tests) and the asyncio one of knn_aio.py (serve-index) answer alike. Bad requests: 400."""

    def __init__(self, indices: dict[str, KnnIndex], embed_text, threads: int = 1):
        self.indices, self.embed_text = indices, embed_text
        self.searchers = {name: SearchBatcher(index, threads) for name, index in indices.items()}

    def get(self, path: str) -> tuple[int, object]:
        if path.rstrip("/") == "/indices-list":
            return 200, sorted(self.indices)
        return 404, {"error": f"no route {path}"}

    def parse(self, path: str, body: bytes) -> tuple[int, object] | Search:
        """A Search, or the (status, payload) answer of a request that needs none."""
        if path.rstrip("/") != "/knn-service":
            return 404, {"error": f"no route {path}"}
        try:
            request = json.loads(body)
            searcher = self.searchers.get(request.get("indice_name"))
            if searcher is None:
                return 400, {"error": f"unknown indice_name {request.get('indice_name')!r}; have {sorted(self.indices)}"}
            if request.get("embedding_input") is None and not request.get("text"):
                return 400, {"error": "give text or embedding_input (image and image_url are not served here)"}
            k = int(request.get("num_result_ids", request.get("num_images", 40)))
            return Search(searcher, request.get("embedding_input"), request.get("text") or "", k,
                          int(request.get("num_images", k)))
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            return 400, {"error": str(err)}

    def post(self, path: str, body: bytes) -> tuple[int, object]:
        """The whole answer, blocking: for a server with a thread per request."""
        search = self.parse(path, body)
        if not isinstance(search, Search):
            return search
        try:
            query = search.embedding if search.embedding is not None else self.embed_text(search.text)
            return 200, search.searcher.submit(query, search.k).result()[: search.n]
        except (ValueError, KeyError, TypeError) as err:
            return 400, {"error": str(err)}


def make_handler(indices: dict[str, KnnIndex], embed_text, threads: int = 1):
    """The threaded server's request handler class serving `indices`; `threads`: faiss threads per batch."""
    api = KnnApi(indices, embed_text, threads)

    class KnnHandler(BaseHTTPRequestHandler):
        # headers and body leave in one write (flushed after each request), with Nagle off: two small writes
        # would wait on the client's delayed ACK
        wbufsize = 1 << 16
        disable_nagle_algorithm = True

        def log_message(self, *args) -> None:  # keep pod logs for progress, not per-request lines
            pass

        def _send(self, status: int, payload) -> None:
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            self._send(*api.get(self.path))

        def do_POST(self) -> None:
            self._send(*api.post(self.path, self.rfile.read(int(self.headers.get("Content-Length", 0)))))

    return KnnHandler


class _Server(ThreadingHTTPServer):
    request_queue_size = 128  # the default backlog of 5 resets the connections of a burst of clients


def serve_until_stopped(server) -> None:
    """Serve until SIGINT or SIGTERM (Ctrl-C with the rest of a run, the driver's or Kubernetes' terminate), then
    shut the server down and return: a quiet exit, since whoever stopped it says why."""
    import signal

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.shutdown()


def serve(handler_cls, host: str = "127.0.0.1", port: int = 0, allow_public_bind: bool = False) -> ThreadingHTTPServer:
    """Start serving in a daemon thread and return the server (its port is server.server_address[1])."""
    if not allow_public_bind and not ipaddress.ip_address(host).is_loopback:
        raise ValueError(f"refusing to bind {host}: the kNN service binds loopback unless allow_public_bind is set")
    server = _Server((host, port), handler_cls)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server
