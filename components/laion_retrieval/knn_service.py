"""Serve a kNN index over clip-retrieval's HTTP API (`POST /knn-service`, `GET /indices-list`).

We serve the API ourselves instead of running `clip-retrieval back`: clip-retrieval 2.45 pins numpy<2, pyarrow<16,
torch, torchvision, open-clip-torch, sentence-transformers, wandb and img2dataset, which cannot share an environment
with the rest (every family is on numpy 2), and at start it loads its CLIP model through all_clip, from the internet;
we need the pipeline's own CLIP model (any transformers CLIP, tiny ones included) to embed text queries.
The index folders we serve are clip-retrieval back's own (`--enable_faiss_memory_mapping True --use_arrow True`):
bench/knn_clip_back.py installs clip-retrieval 2.45.0 in a throwaway environment and drives its loading and query
code (load_index, ArrowMetadataProvider, KnnService.query) over a folder `pipeline.py index` built: the same ids and
URLs as here. Binds loopback unless told otherwise (a pod: --allow-public-bind).
"""
from __future__ import annotations

import ipaddress
import json
import threading
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


def make_handler(indices: dict[str, KnnIndex], embed_text):
    class KnnHandler(BaseHTTPRequestHandler):
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
            if self.path.rstrip("/") == "/indices-list":
                self._send(200, sorted(indices))
            else:
                self._send(404, {"error": f"no route {self.path}"})

        def do_POST(self) -> None:
            if self.path.rstrip("/") != "/knn-service":
                self._send(404, {"error": f"no route {self.path}"})
                return
            try:
                request = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                index = indices.get(request.get("indice_name"))
                if index is None:
                    self._send(400, {"error": f"unknown indice_name {request.get('indice_name')!r}; have {sorted(indices)}"})
                    return
                if request.get("embedding_input") is not None:
                    query = request["embedding_input"]
                elif request.get("text"):
                    query = embed_text(request["text"])
                else:
                    self._send(400, {"error": "give text or embedding_input (image and image_url are not served here)"})
                    return
                k = int(request.get("num_result_ids", request.get("num_images", 40)))
                results = index.search(query, k)[: int(request.get("num_images", k))]
                self._send(200, results)
            except (ValueError, KeyError, TypeError) as err:
                self._send(400, {"error": str(err)})

    return KnnHandler


def serve(handler_cls, host: str = "127.0.0.1", port: int = 0, allow_public_bind: bool = False) -> ThreadingHTTPServer:
    """Start serving in a daemon thread and return the server (its port is server.server_address[1])."""
    if not allow_public_bind and not ipaddress.ip_address(host).is_loopback:
        raise ValueError(f"refusing to bind {host}: the kNN service binds loopback unless allow_public_bind is set")
    server = ThreadingHTTPServer((host, port), handler_cls)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server
