"""Serve index folders over clip-retrieval's HTTP API (components/laion_retrieval/knn_service.py, on aiohttp:
knn_aio.py), memory-mapped.
Runs in the vision family's environment (faiss, and the CLIP text model for text queries).

    python -m components.knn_index.serve --index NAME=FOLDER [--index ...] [--clip-model M] [--host H] [--port P]
    python -m components.knn_index.serve --indices-paths indices.json      # clip-retrieval back's file: {"NAME": "FOLDER"}

A folder on an object store (gs://...) is first copied to --local-dir (memory mapping needs a local file; files
already there with the same size are kept, so a restarted pod on the same volume starts at once). The server
listens only once every index is loaded, so `GET /indices-list` answering is the readiness signal.
Without --clip-model the service answers embedding queries only (a text query gets HTTP 400 saying so).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import signal
import sys
import time

from cnpipe import storage
from components.laion_retrieval import index as knn_index
from components.laion_retrieval import knn_aio, knn_service


def log(message: str) -> None:
    print(f"serve-index: {message}", file=sys.stderr, flush=True)


def local_copy(uri: str, local_dir: str, name: str) -> str:
    """`uri` itself when local; else a copy under local_dir/name (index.json last, so a half copy is redone)."""
    if "://" not in uri or uri.startswith("file://"):
        return uri.removeprefix("file://")
    target = pathlib.Path(local_dir) / name
    fs, root = storage.filesystem(uri)
    files = [p for p in fs.find(root) if not p.rsplit("/", 1)[-1].startswith(".tmp-")]
    files.sort(key=lambda p: p.endswith("/index.json"))
    total = 0
    started = time.time()
    for path in files:
        relative = path[len(root.rstrip("/")) + 1:]
        if relative.startswith("_embeddings/"):  # the staged copy of a clip_embed output: not served
            continue
        dest = target / relative
        size = fs.size(path)
        total += size
        if dest.exists() and dest.stat().st_size == size:
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        partial = dest.with_name(f".tmp-{dest.name}")
        fs.get_file(path, str(partial))
        partial.replace(dest)
    log(f"{uri} is at {target} ({total / 2**30:.2f} GiB, {time.time() - started:.0f} s)")
    return str(target)


class NoTextModel:
    def __call__(self, text: str):
        raise ValueError("this service has no text model (start it with --clip-model): query with embedding_input")


def load(indices: dict[str, str], local_dir: str) -> dict[str, knn_index.KnnIndex]:
    loaded = {}
    for name, uri in indices.items():
        started = time.time()
        index = knn_index.KnnIndex(local_copy(uri, local_dir, name))
        loaded[name] = index
        log(f"{name}: {index.index.ntotal} vectors of dimension {index.dim}, {index.index_bytes / 2**20:.1f} MiB "
            f"memory-mapped, metadata columns {', '.join(index.columns)} ({time.time() - started:.1f} s)")
    return loaded


def parse_indices(pairs: list[str], indices_paths: str) -> dict[str, str]:
    indices: dict[str, str] = {}
    if indices_paths:
        for name, value in json.loads(pathlib.Path(indices_paths).read_text()).items():
            indices[name] = value if isinstance(value, str) else value["indice_folder"]
    for pair in pairs:
        name, sep, uri = pair.partition("=")
        if not sep or not name or not uri:
            raise SystemExit(f"--index takes NAME=FOLDER, not {pair!r}")
        indices[name] = uri
    if not indices:
        raise SystemExit("no index to serve: give --index NAME=FOLDER or --indices-paths FILE")
    return indices


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--index", action="append", default=[], metavar="NAME=FOLDER")
    parser.add_argument("--indices-paths", default="", help="clip-retrieval back's JSON file of NAME: FOLDER")
    parser.add_argument("--clip-model", default="", help="the CLIP model (hub id or folder) that embeds text queries")
    parser.add_argument("--local-dir", default=".cache/knn-index", help="where an index on an object store is copied")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=1234)
    parser.add_argument("--allow-public-bind", action="store_true", help="bind a non-loopback address (in a pod: 0.0.0.0)")
    parser.add_argument("--threads", type=int, default=1,
                        help="faiss threads per batch of searches (concurrent queries are searched together)")
    parser.add_argument("--ready-file", default="", help="written with the port once serving")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # stopped while loading: end at once
    import faiss

    faiss.omp_set_num_threads(max(1, args.threads))
    indices = load(parse_indices(args.index, args.indices_paths), args.local_dir)
    embed_text = knn_service.ClipTextEmbedder(args.clip_model) if args.clip_model else NoTextModel()
    server = knn_aio.serve(knn_service.KnnApi(indices, embed_text, args.threads), host=args.host, port=args.port,
                           allow_public_bind=args.allow_public_bind)
    port = server.server_address[1]
    log(f"serving {', '.join(sorted(indices))} on http://{args.host}:{port}/knn-service "
        f"(POST /knn-service, GET /indices-list){'' if args.clip_model else '; embedding queries only'}")
    if args.ready_file:
        pathlib.Path(args.ready_file).write_text(json.dumps({"port": port, "knn_url": f"http://{args.host}:{port}/knn-service"}))
    knn_service.serve_until_stopped(server)


if __name__ == "__main__":
    main()
