"""The embedded default's stand-in for the web and for LAION's kNN service, on one loopback port.

GET  /images/<path>   the pool's files (404 for the ones that "rotted")
GET  /redirect?to=U   a 302 to U (lets tests check that redirects are guarded too)
POST /knn-service     clip-retrieval's API over a faiss index of the pool, embedded with the
                      pipeline's own CLIP model (built once, cached beside the pool)
"""
from __future__ import annotations

import argparse
import errno
import json
import mimetypes
import pathlib
import signal
import sys
import urllib.parse

import numpy as np
from PIL import Image

from components.laion_retrieval import index as knn_index
from components.laion_retrieval import knn_service


def build_pool_index(assets: pathlib.Path, clip_model: str) -> pathlib.Path:
    """The faiss index of the pool, built once per pool and model (remade when the pool's entries or the model change)."""
    import hashlib

    folder = assets / "pool-index"
    listing = (assets / "pool" / "index.json").read_bytes()
    source = json.dumps({"pool": hashlib.sha256(listing).hexdigest(), "clip_model": clip_model})
    if (folder / "image.index").exists() and (folder / "source.json").exists() and (folder / "source.json").read_text() == source:
        return folder
    from components.clip_embed.stage import ClipImageEmbedder

    entries = json.loads(listing)
    embedder = ClipImageEmbedder(clip_model, "cpu")
    vectors = embedder([Image.open(assets / "pool" / e["embed"]).convert("RGB") for e in entries])
    knn_index.build(np.asarray(vectors), [e["path"] for e in entries], [e["caption"] for e in entries], str(folder))
    (folder / "source.json").write_text(source)
    return folder


def make_handler(pool: pathlib.Path, indices, embed_text, base_url: list[str]):
    knn_handler = knn_service.make_handler(indices, embed_text)

    class LocalWebHandler(knn_handler):
        def do_GET(self) -> None:
            if self.path.startswith("/redirect?"):
                target = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query).get("to", [""])[0]
                self.send_response(302)
                self.send_header("Location", target)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if not self.path.startswith("/images/"):
                return super().do_GET()
            target = (pool / self.path[len("/images/"):]).resolve()
            if pool.resolve() not in target.parents or not target.is_file():
                self.send_error(404)
                return
            body = target.read_bytes()
            self.send_response(200)
            self.send_header("Content-Type", mimetypes.guess_type(target.name)[0] or "application/octet-stream")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _send(self, status, payload) -> None:
            if isinstance(payload, list):  # pool paths become absolute loopback URLs
                payload = [{**r, "url": f"{base_url[0]}/images/{r['url']}"} if isinstance(r, dict) else r for r in payload]
            super()._send(status, payload)

    return LocalWebHandler


def listen(handler, port: int):
    """Serve on `port`, or, when it is taken, on a free one, saying so in one line: the run reads the port from the
    ready file, and a traceback for an expected fallback only alarms."""
    try:
        return knn_service.serve(handler, port=port)
    except OSError as err:
        if not port or err.errno != errno.EADDRINUSE:
            sys.exit(f"local_web: cannot serve on 127.0.0.1:{port}: {err.strerror or err}")
    server = knn_service.serve(handler, port=0)
    print(f"port {port} is taken: serving on {server.server_address[1]} instead (row ids, which come from the URLs, differ "
          "from other runs'; URLs retrieved by an earlier attempt may now fail to download and are counted as such)",
          file=sys.stderr)
    return server


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--assets", required=True)
    parser.add_argument("--clip-model", required=True)
    parser.add_argument("--indice-name", default="embedded-pool")
    parser.add_argument("--ready-file", required=True, help="written with the port once serving")
    parser.add_argument("--port", type=int, default=0, help="0: any free port; a taken one falls back to a free one (a resumed run passes its old one: URLs name it)")
    args = parser.parse_args()
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # stopped while loading: end at once, without a traceback
    assets = pathlib.Path(args.assets)
    index = knn_index.KnnIndex(str(build_pool_index(assets, args.clip_model)))
    base_url: list[str] = [""]
    handler = make_handler(assets / "pool", {args.indice_name: index}, knn_service.ClipTextEmbedder(args.clip_model), base_url)
    server = listen(handler, args.port)
    port = server.server_address[1]
    base_url[0] = f"http://127.0.0.1:{port}"
    pathlib.Path(args.ready_file).write_text(json.dumps({"port": port, "knn_url": f"{base_url[0]}/knn-service"}))
    # Ctrl-C reaches this process with the rest of the run, and the driver then terminates it: either way it stops
    # serving and exits quietly (the driver says, once, what was interrupted)
    knn_service.serve_until_stopped(server)


if __name__ == "__main__":
    main()
