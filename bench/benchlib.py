"""What the bench scripts share: repeated, interleaved timing; the images they run on; result files.

Only the standard library, numpy, pyarrow, Pillow and cnpipe: every family's environment has them,
so each script runs in its own stage's family interpreter. Speed is only ever reported as a ratio
against a reference measured in the same process (or by the same script, for commands), with the
two sides interleaved so that a load change on a shared machine hits both alike.
"""
from __future__ import annotations

import datetime as _dt
import io
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable

REPO = pathlib.Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
if str(REPO) not in sys.path:  # `python bench/<script>.py` puts bench/, not the repo, first on sys.path
    sys.path.insert(0, str(REPO))


# ---------------------------------------------------------------- timing

def cpu_seconds() -> float:
    """CPU time (user + system) of this process and of the children it has waited for (pool workers, commands)."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def interleaved(sides: dict[str, Callable[[], object]], repeats: int) -> dict[str, dict[str, list[float]]]:
    """Time every side `repeats` times, alternating the order on each round (A B, B A, ...).

    Returns {side: {"wall": [s, ...], "cpu": [s, ...]}}. CPU time (this process and its waited-for children)
    is the load-robust measure of the work done: on a shared machine wall time also holds waiting for a core.
    """
    names = list(sides)
    samples: dict[str, dict[str, list[float]]] = {name: {"wall": [], "cpu": []} for name in names}
    for round_ in range(repeats):
        for name in names if round_ % 2 == 0 else names[::-1]:
            cpu, started = cpu_seconds(), time.perf_counter()
            sides[name]()
            samples[name]["wall"].append(time.perf_counter() - started)
            samples[name]["cpu"].append(cpu_seconds() - cpu)
            print(f"  {name}: {samples[name]['wall'][-1]:.2f} s wall, {samples[name]['cpu'][-1]:.2f} s CPU", file=sys.stderr, flush=True)
    return samples


def summary(samples: dict[str, list[float]], items: int | None = None) -> dict:
    """Best (least disturbed) and median of repeated wall times, the rates they give for `items`, and CPU time."""
    wall, cpu = samples["wall"], samples["cpu"]
    out = {"best_s": round(min(wall), 4), "median_s": round(statistics.median(wall), 4),
           "runs_s": [round(s, 4) for s in wall], "cpu_best_s": round(min(cpu), 4),
           "cpu_median_s": round(statistics.median(cpu), 4), "cpu_runs_s": [round(s, 4) for s in cpu]}
    if items:
        out["items"] = items
        out["best_per_s"] = round(items / min(wall), 2)
        out["median_per_s"] = round(items / statistics.median(wall), 2)
        out["cpu_ms_per_item"] = round(1000 * statistics.median(cpu) / items, 3)
    return out


def speed_ratio(ours: dict, reference: dict) -> dict:
    """ours ÷ reference as throughput (>1: ours is faster), from the best and from the median runs; and the
    CPU-time ratio reference ÷ ours (>1: ours spends less CPU on the same work)."""
    return {"best": round(reference["best_s"] / ours["best_s"], 3),
            "median": round(reference["median_s"] / ours["median_s"], 3),
            "cpu": round(reference["cpu_median_s"] / ours["cpu_median_s"], 3)}


# ---------------------------------------------------------------- where it ran

def cores() -> int:
    """The cores this process may run on (its affinity), which thread pools should be sized to."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram_gib = None
    try:
        for line in pathlib.Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram_gib = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": cores(),
        "ram_gib": ram_gib,
        "os": platform.platform(),
        "python": platform.python_version(),
        "interpreter": sys.executable,
        "load_average": [round(v, 2) for v in os.getloadavg()],  # others share the machine: read ratios with this
    }


def versions(*distributions: str) -> dict:
    from importlib import metadata

    found = {}
    for name in distributions:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def start_server(argv: list[str], ready_file: pathlib.Path, what: str, timeout_s: float = 60, **popen) -> tuple[subprocess.Popen, dict]:
    """Start a server process that writes `ready_file` (JSON) once it listens; return it and that JSON."""
    server = subprocess.Popen(argv, **popen)
    deadline = time.time() + timeout_s
    while not ready_file.exists():
        if server.poll() is not None or time.time() > deadline:
            server.kill()
            raise RuntimeError(f"{what} did not start")
        time.sleep(0.05)
    time.sleep(0.05)  # the file may be written just before the server loop starts: give it a moment
    return server, json.loads(ready_file.read_text())


def write_result(name: str, payload: dict, libraries: tuple[str, ...] = ()) -> pathlib.Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "created": _dt.datetime.now().isoformat(timespec="seconds"),
               "machine": machine(), "versions": versions("numpy", "pyarrow", "pillow", *libraries), **payload}
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=1))
    print(f"wrote {path.relative_to(REPO)}", file=sys.stderr)
    return path


def print_table(headers: list[str], rows: list[list]) -> None:
    cells = [[str(c) for c in headers]] + [[f"{c:.2f}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for i, row in enumerate(cells):
        print("  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths))))
        if i == 0:
            print("  ".join("-" * w for w in widths))


# ---------------------------------------------------------------- inputs

def default_assets() -> pathlib.Path:
    import pipeline_configs

    return pathlib.Path(pipeline_configs.EMBEDDED_ASSETS)


def _family_run(family: str, *args: str) -> None:
    from cnpipe.families import family_python

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([family_python(family), *args], check=True, env=env, cwd=REPO)


def ensure_assets(assets: pathlib.Path | None = None) -> pathlib.Path:
    """The embedded seeds and pool, made by the core family's interpreter (scikit-image) when missing."""
    assets = assets or default_assets()
    if not ((assets / "seeds").exists() and (assets / "pool").exists()):
        _family_run("core", "-m", "cnpipe.embedded.assets", str(assets))
    return assets


def ensure_tiny_models(assets: pathlib.Path | None = None) -> pathlib.Path:
    """The tiny CLIP and BLIP, built from configs by the vision family's interpreter when missing."""
    assets = ensure_assets(assets)
    models = assets / "models"
    if not ((models / "tiny-clip" / "model.safetensors").exists() and (models / "tiny-blip" / "model.safetensors").exists()):
        _family_run("vision", "-m", "cnpipe.embedded.tiny_models", str(models))
    return models


def usable_images(assets: pathlib.Path, min_side: int = 16) -> list[tuple[str, bytes]]:
    """The seed and pool files that hub_load would keep (they decode, shorter side >= min_side): the
    deliberately broken ones are left out, so that every side of a comparison does the same work."""
    from cnpipe import images

    found = []
    for folder in ("seeds", "pool"):
        for path in sorted((assets / folder).iterdir()):
            if path.suffix.lower() not in (".jpg", ".jpeg", ".png"):
                continue
            blob = path.read_bytes()
            try:
                images.decode_rgb(blob, min_side=min_side)
            except images.ImageRejected:
                continue
            found.append((f"{folder}/{path.name}", blob))
    return found


def png_bomb(side: int = 12000) -> bytes:
    """A decompression bomb: an RGB PNG of side x side black pixels (12000: 144 million pixels, 432 MB decoded) in
    about 420 kB, compressed row by row so that the pixels are never held here."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row, deflate = b"\0" * (1 + 3 * side), zlib.compressobj(9)  # each row: filter type 0, then its RGB bytes
    pixels = b"".join(deflate.compress(row) for _ in range(side)) + deflate.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", pixels) + chunk(b"IEND", b""))


def photo_jpeg(width: int = 1024, height: int = 768) -> bytes:
    """An ordinary photo-sized JPEG (smooth gradients and grain, about 300 kB)."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // width, y * 255 // height, (x + y) * 255 // (width + height)], axis=-1)
    grain = np.random.default_rng(0).integers(-24, 24, base.shape)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(base + grain, 0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def serve_files(files: dict[str, tuple[str, bytes]]):
    """A loopback web server in a thread answering GET path with (content type, body); returns it and its base URL."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:
            if self.path not in files:
                self.send_error(404)
                return
            kind, body = files[self.path]
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def replicate(items: list, count: int) -> list:
    return [items[i % len(items)] for i in range(count)]


def image_rows(blobs: list[tuple[str, bytes]]) -> dict[str, list]:
    """Rows in the columns the image stages read and carry (what download and blip_caption write)."""
    from PIL import Image

    sizes = [Image.open(io.BytesIO(blob)).size for _, blob in blobs]
    return {
        "id": [f"bench-{i:06d}" for i in range(len(blobs))],
        "image": [blob for _, blob in blobs],
        "width": [w for w, _ in sizes],
        "height": [h for _, h in sizes],
        "url": [None] * len(blobs),
        "source_caption": [None] * len(blobs),
        "origin": [f"bench:{name}" for name, _ in blobs],
    }


def write_dataset(uri: str, columns: dict[str, list], schema, rows_per_shard: int, stage: str = "bench_input"):
    """A cnpipe dataset (shards, commit markers, manifest) holding `columns`, as a producing stage leaves it."""
    import pyarrow as pa

    from cnpipe.dataset import ShardedOutput, ShardResult

    table = pa.table(columns, schema=schema)
    output = ShardedOutput(uri, stage, "bench", schema)
    names = []
    for index, start in enumerate(range(0, table.num_rows, rows_per_shard)):
        name = f"part-{index:05d}"
        shard = table.slice(start, rows_per_shard)
        output.commit(name, ShardResult(shard), rows_in=shard.num_rows)
        names.append(name)
    return output.finalize(names, inputs=["bench"])
