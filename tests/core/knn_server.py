"""A loopback /knn-service that misbehaves on demand, and the laion_retrieval stage run against it in-process."""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

import pyarrow as pa

import pipeline_configs
from cnpipe.dataset import Manifest, ShardedOutput
from components.laion_retrieval import stage

SEEDS_SCHEMA = pa.schema([("id", pa.string()), ("clip_embedding", pa.list_(pa.float32()))])


def row(i: int, similarity: float = 0.9) -> dict:
    return {"id": i, "url": f"http://images.example.com/{i}.jpg", "caption": f"caption {i}", "similarity": similarity}


class KnnServer:
    """`answer(handler)` writes the whole raw response of each POST; requests (headers, body) are recorded."""

    def __init__(self):
        self.requests: list[dict] = []
        self.answer: Callable = lambda handler: self.send_json(handler, [])
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                server.requests.append({"headers": dict(self.headers), "body": json.loads(body)})
                self.close_connection = True
                try:
                    server.answer(self)
                except OSError:  # the client hung up on a drip or a large answer, as it should
                    pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.http.handle_error = lambda *args: None
        threading.Thread(target=self.http.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}/knn-service"

    @staticmethod
    def send_raw(handler, body: bytes, status: int = 200, headers: dict | None = None) -> None:
        handler.send_response(status)
        for key, value in {"Content-Type": "application/json", "Content-Length": str(len(body)), **(headers or {})}.items():
            if value is not None:
                handler.send_header(key, value)
        handler.end_headers()
        handler.wfile.write(body)

    @classmethod
    def send_json(cls, handler, payload, status: int = 200) -> None:
        cls.send_raw(handler, json.dumps(payload).encode(), status)

    @staticmethod
    def drip(handler, data: bytes, every_s: float) -> None:
        for byte in data:
            handler.wfile.write(bytes([byte]))
            handler.wfile.flush()
            time.sleep(every_s)

    def close(self) -> None:
        self.http.shutdown()
        self.http.server_close()


def config(url: str, **retrieval) -> pipeline_configs.PipelineConfig:
    """Prompts only (one query per prompt), fast timeouts, one retry."""
    cfg = pipeline_configs.embedded("/unused")
    settings = {"service_url": url, "prompts": ["a cat"], "use_image_seeds": False, "num_images": 10,
                "retries": 1, "timeout_s": 5.0, "query_deadline_s": 10.0, **retrieval}
    for key, value in settings.items():
        assert hasattr(cfg.retrieval, key), key
        setattr(cfg.retrieval, key, value)
    return cfg


def empty_seeds(tmp_path) -> Manifest:
    """The stage's input: no seed images (the queries are the prompts)."""
    return ShardedOutput(str(tmp_path / "seeds"), "clip_embed", "test", SEEDS_SCHEMA).finalize([], inputs=[])


def run_stage(tmp_path, cfg: pipeline_configs.PipelineConfig) -> Manifest:
    return stage.run(cfg, {"seeds": empty_seeds(tmp_path)}, str(tmp_path / "retrieved"))
