"""Download stage vs the img2dataset command line: the same URL list, served from a loopback web server.

    PYTHONPATH=. .venvs/download/bin/python bench/download.py [--urls 1200] [--rows-per-shard 300] [--repeats 3] [--threads 16]

ours        `python -m components.download` (the stage's command, as kfp runs it): reads the URL shards,
            checks each URL against the guard, runs img2dataset's Downloader in its worker processes
            (guarded connections and redirects), maps every failure to a reason, commits Parquet shards.
reference   `img2dataset --url_list urls.parquet --output_format parquet ...` with the same settings
            (image size, resize mode, threads, processes, timeouts, retries, encoding, hashing off).

Both are timed as whole commands (interpreter start-up and imports included), interleaved. The web:
--distinct JPEGs of 512-1024 px (photos from the embedded seeds, with sensor-like noise so they weigh
what photos weigh), behind --urls distinct URLs, served from memory by a separate process.
Writes bench/results/download.json.
"""
from __future__ import annotations

import argparse
import glob
import io
import json
import os
import pathlib
import subprocess
import sys
import tempfile

import benchlib  # noqa: E402  (puts the repo on sys.path)

ENV = {**os.environ, "PYTHONPATH": str(benchlib.REPO), "NO_ALBUMENTATIONS_UPDATE": "1"}


# ---------------------------------------------------------------- the web

def make_web_images(folder: pathlib.Path, count: int, seed: int = 0) -> list[int]:
    """Photos resized so the longer side is 512-1024 px, plus noise; returns their sizes in bytes."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    photos = [Image.open(io.BytesIO(blob)).convert("RGB") for name, blob in benchlib.usable_images(benchlib.ensure_assets())
              if name.startswith("seeds/") and "pattern" not in name]
    folder.mkdir(parents=True, exist_ok=True)
    sizes = []
    for i in range(count):
        photo = photos[i % len(photos)]
        side = int(rng.integers(512, 1025))
        scale = side / max(photo.size)
        image = photo.resize((max(1, round(photo.size[0] * scale)), max(1, round(photo.size[1] * scale))), Image.Resampling.BICUBIC)
        pixels = np.asarray(image, dtype=np.float32) + rng.normal(0, 8, (image.size[1], image.size[0], 3))
        path = folder / f"{i:04d}.jpg"
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, format="JPEG", quality=95)
        sizes.append(path.stat().st_size)
    return sizes


def serve(folder: str, ready_file: str) -> None:
    """Serve /img/<n>.jpg as the (n mod count)-th file of `folder`, from memory, until killed."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    bodies = [p.read_bytes() for p in sorted(pathlib.Path(folder).glob("*.jpg"))]

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:
            try:
                number = int(self.path.rsplit("/", 1)[-1].split(".")[0])
            except ValueError:
                self.send_error(404)
                return
            body = bodies[number % len(bodies)]
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = 256  # img2dataset's threads connect at once; a short backlog adds SYN retries

    server = Server(("127.0.0.1", 0), Handler)
    pathlib.Path(ready_file).write_text(json.dumps({"port": server.server_address[1]}))
    server.serve_forever()


def start_web(folder: pathlib.Path, tmp: pathlib.Path):
    ready = tmp / "web.json"
    web, info = benchlib.start_server([sys.executable, __file__, "--serve", str(folder), "--ready-file", str(ready)],
                                      ready, "the loopback web server", env=ENV)
    return web, f"http://127.0.0.1:{info['port']}"


# ---------------------------------------------------------------- the two commands

def our_command(config, retrieved_uri: str, out: str) -> list[str]:
    from components.registry import stage_command

    return stage_command("download", config.to_json(), {"retrieved": retrieved_uri}, out)


def img2dataset_command(cfg, url_list: str, out: str, count: int) -> list[str]:
    exe = str(pathlib.Path(sys.executable).with_name("img2dataset"))
    options = {
        "url_list": url_list, "input_format": "parquet", "url_col": "url", "save_additional_columns": '["id"]',
        "output_format": "parquet", "output_folder": out,
        "number_sample_per_shard": -(-count // max(1, cfg.processes_count)),  # one shard per process, as ours splits
        "image_size": cfg.image_size, "resize_mode": cfg.resize_mode, "resize_only_if_bigger": True,
        "min_image_size": cfg.min_image_size, "max_aspect_ratio": cfg.max_aspect_ratio, "max_image_area": 89_478_485,
        "timeout": cfg.timeout_s, "retries": cfg.retries, "thread_count": cfg.thread_count,
        "processes_count": cfg.processes_count, "encode_format": cfg.encode_format, "encode_quality": cfg.encode_quality,
        "user_agent_token": cfg.user_agent_token, "disallowed_header_directives": json.dumps(cfg.disallowed_header_directives),
        "incremental_mode": "incremental", "enable_wandb": False, "compute_hash": "None", "extract_exif": False,
    }
    return [exe] + [f"--{k}={v}" for k, v in options.items()]


def run_command(argv: list[str], log: pathlib.Path) -> None:
    with open(log, "wb") as out:
        done = subprocess.run(argv, env=ENV, stdout=out, stderr=subprocess.STDOUT, cwd=benchlib.REPO)
    if done.returncode != 0:
        sys.stderr.write(log.read_bytes()[-3000:].decode(errors="replace"))
        raise RuntimeError(f"{argv[0]} exited with {done.returncode}")


def img2dataset_successes(folder: str) -> int:
    import pyarrow.parquet as pq

    return sum(pq.read_table(p, columns=["status"])["status"].to_pylist().count("success") for p in glob.glob(f"{folder}/*.parquet"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--urls", type=int, default=1200)
    parser.add_argument("--distinct", type=int, default=30, help="distinct images behind the URLs")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--resize-mode", default="keep_ratio")
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--rows-per-shard", type=int, default=300,
                        help="URL rows per input shard of our stage (0: one shard); img2dataset reads one URL file")
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--ready-file", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.serve, args.ready_file)
        return 0

    import pyarrow as pa
    import pyarrow.parquet as pq

    import pipeline_configs
    from cnpipe.dataset import Manifest
    from components.laion_retrieval.stage import RETRIEVED_SCHEMA

    config = pipeline_configs.with_overrides(pipeline_configs.embedded(), [
        f"download.image_size={args.image_size}", f"download.resize_mode={args.resize_mode}",
        f"download.thread_count={args.threads}", f"download.processes_count={args.processes}",
    ])
    cfg = config.download
    with tempfile.TemporaryDirectory(prefix="bench-download-") as tmp_name:
        tmp = pathlib.Path(tmp_name)
        sizes = make_web_images(tmp / "web", args.distinct)
        web, base = start_web(tmp / "web", tmp)
        try:
            urls = [f"{base}/img/{i}.jpg" for i in range(args.urls)]
            ids = [f"url-{i:06d}" for i in range(args.urls)]
            rows = {"id": ids, "url": urls, "source_caption": [None] * len(urls), "similarity": [1.0] * len(urls),
                    "query": ["bench"] * len(urls), "pwatermark": [None] * len(urls), "punsafe": [None] * len(urls)}
            retrieved = benchlib.write_dataset(str(tmp / "retrieved"), rows, RETRIEVED_SCHEMA,
                                               args.rows_per_shard or len(urls), stage="laion_retrieval")
            pq.write_table(pa.table({"url": urls, "id": ids}), tmp / "urls.parquet")
            print(f"download: {len(urls)} URLs over {args.distinct} JPEGs (mean {sum(sizes) / len(sizes) / 1e3:.0f} kB), "
                  f"image_size {cfg.image_size} {cfg.resize_mode}, {cfg.thread_count} threads, {cfg.processes_count} "
                  f"process(es), {len(retrieved.shards)} input shard(s) for ours", file=sys.stderr)
            counter = {"ours": 0, "img2dataset": 0}
            successes = {"ours": [], "img2dataset": []}

            def ours():
                counter["ours"] += 1
                out = tmp / f"ours-{counter['ours']}"
                run_command(our_command(config, retrieved.uri, str(out)), tmp / "ours.log")
                successes["ours"].append(Manifest.load(str(out)).rows_out)

            def reference():
                counter["img2dataset"] += 1
                out = tmp / f"img2dataset-{counter['img2dataset']}"
                run_command(img2dataset_command(cfg, str(tmp / "urls.parquet"), str(out), len(urls)), tmp / "img2dataset.log")
                successes["img2dataset"].append(img2dataset_successes(str(out)))

            seconds = benchlib.interleaved({"ours": ours, "img2dataset": reference}, args.repeats)
        finally:
            web.terminate()
            web.wait(timeout=10)

    entry = {side: benchlib.summary(s, len(urls)) for side, s in seconds.items()}
    overhead = {"best": round(entry["ours"]["best_s"] / entry["img2dataset"]["best_s"], 3),
                "median": round(entry["ours"]["median_s"] / entry["img2dataset"]["median_s"], 3)}
    print(f"\ndownload, {len(urls)} URLs, best of {args.repeats}; overhead = ours wall time / img2dataset wall time")
    benchlib.print_table(
        ["command", "best s", "median s", "images/s (best)", "downloaded"],
        [[side, entry[side]["best_s"], entry[side]["median_s"], entry[side]["best_per_s"], "/".join(map(str, sorted(set(successes[side]))))]
         for side in entry])
    print(f"overhead ratio: {overhead['best']:.3f} (best), {overhead['median']:.3f} (median); "
          f"speed ratio ours/img2dataset: {1 / overhead['best']:.3f}")
    if set(successes["ours"]) != set(successes["img2dataset"]):
        print(f"WARNING: the two sides downloaded different counts {successes}: the comparison is not like for like")
    benchlib.write_result("download", {
        "urls": len(urls), "distinct_images": args.distinct, "mean_kb": round(sum(sizes) / len(sizes) / 1e3, 1),
        "image_size": cfg.image_size, "resize_mode": cfg.resize_mode, "threads": cfg.thread_count,
        "processes": cfg.processes_count, "input_shards_ours": len(retrieved.shards), "repeats": args.repeats,
        "downloaded": successes, "results": entry, "overhead_ratio": overhead,
        "speed_ratio": {k: round(1 / v, 3) for k, v in overhead.items()},
        "reference": "img2dataset CLI, same settings, one shard per process",
    }, libraries=("img2dataset",))
    return 0


if __name__ == "__main__":
    sys.exit(main())
