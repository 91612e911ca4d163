"""Peak memory of every data stage on 1x and 10x the data: streaming means it must stay flat.

    PYTHONPATH=. .venvs/core/bin/python bench/memory.py [--scale 10] [--rows-per-shard 8]

Runs the data half stage by stage, each as the command kfp runs (`python -m components.<stage>` in its
family's interpreter): hub_load, clip_embed, laion_retrieval (against the embedded loopback kNN service),
download (from the embedded loopback web), blip_caption, conditioning. The data: the embedded seed
folder (good and broken images, as the embedded run uses it), and that folder copied --scale times;
rows_per_shard stays fixed, so 10x data is 10x the shards, not bigger shards.

Two peaks per stage run:
  max process   the largest resident set of any one process of the stage (/usr/bin/time's maximum RSS,
                which is getrusage's of the command and the children it waited for)
  tree          the largest sum over the stage's process tree (the stage plus its workers: conditioning's
                pool, img2dataset's processes) of proportional set sizes (PSS: pages the processes share,
                e.g. forked workers', counted once, as a pod's memory limit counts them), sampled every 50 ms
Target: 10x/1x < 1.5 for both. Writes bench/results/memory.json.

    PYTHONPATH=. .venvs/core/bin/python bench/memory.py --bombs 16

instead runs the download stage alone on N URLs of a decompression bomb (a 12000x12000 PNG of ~420 kB: 432 MB
decoded) and on N URLs of an ordinary photo (1024x768 JPEG), from a loopback server, with the same two peaks: the
guard refuses a bomb from its header, before img2dataset decodes it, so the ratio bombs/photos stays near 1.
Writes bench/results/memory_bombs.json.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import benchlib  # noqa: E402  (puts the repo on sys.path)

PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024
# (stage, {input name: producing stage}) in pipeline order, as pipeline.py wires them.
DATA_STAGES = [
    ("hub_load", {}),
    ("clip_embed", {"seeds": "hub_load"}),
    ("laion_retrieval", {"seeds": "clip_embed"}),
    ("download", {"retrieved": "laion_retrieval", "seeds": "clip_embed"}),
    ("blip_caption", {"images": "download"}),
    ("conditioning", {"images": "blip_caption"}),
]


def _pss_kib(pid: int, rss_kib: int) -> int:
    """Proportional set size: pages shared between processes (worker processes forked from one parent) counted once in a sum."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return rss_kib


def _tree_pss_kib(root_pid: int) -> int:
    """Memory of root_pid and all its descendants (PSS, else RSS), from /proc."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            ppid, pages = int(fields[1]), int(fields[21])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
        rss[int(entry)] = pages * PAGE_KIB
    total, todo = 0, [root_pid]
    while todo:
        pid = todo.pop()
        if pid in rss:
            total += _pss_kib(pid, rss[pid])
        todo.extend(children.get(pid, []))
    return total


def run_measured(argv: list[str], env: dict, log: pathlib.Path) -> dict:
    """Run a command under /usr/bin/time; return its wall time, max single-process RSS, peak tree PSS and the CPU time
    (user + system) of it and its children: on a shared machine the load-robust measure of the work."""
    report = log.with_suffix(".time")
    peak = [0]
    with open(log, "wb") as out:
        process = subprocess.Popen(["/usr/bin/time", "-f", "%M %U %S", "-o", str(report), *argv], env=env, stdout=out,
                                   stderr=subprocess.STDOUT, cwd=benchlib.REPO)
        started = time.perf_counter()

        def sample() -> None:
            while process.poll() is None:
                peak[0] = max(peak[0], _tree_pss_kib(process.pid))
                time.sleep(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        code = process.wait()
        seconds = time.perf_counter() - started
        sampler.join()
    if code != 0:
        sys.stderr.write(log.read_bytes()[-3000:].decode(errors="replace"))
        raise RuntimeError(f"{argv[2:4]} exited with {code}")
    max_kib, user, system = report.read_text().strip().splitlines()[-1].split()
    return {"seconds": round(seconds, 2), "cpu_s": round(float(user) + float(system), 2),
            "max_process_mib": round(int(max_kib) / 1024, 1), "tree_mib": round(peak[0] / 1024, 1)}


def scaled_seeds(seeds: pathlib.Path, target: pathlib.Path, scale: int) -> pathlib.Path:
    """`scale` copies of the seed folder side by side (distinct paths, so distinct ids)."""
    for copy in range(scale):
        shutil.copytree(seeds, target / f"copy-{copy:03d}")
    return target


def start_local_web(assets: pathlib.Path, config, tmp: pathlib.Path):
    """The embedded loopback web + kNN service, as orchestration/local_run.py starts it."""
    from cnpipe.families import family_python

    ready = tmp / "local_web.json"
    web, info = benchlib.start_server(
        [family_python("vision"), "-m", "orchestration.local_web", "--assets", str(assets), "--clip-model",
         config.clip_embed.model, "--indice-name", config.retrieval.indice_name, "--ready-file", str(ready)],
        ready, "the embedded web/kNN service", timeout_s=300,
        env={**os.environ, "PYTHONPATH": str(benchlib.REPO)}, cwd=benchlib.REPO, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)
    return web, info["knn_url"]


def run_data_half(config, root: pathlib.Path, stages: list[str]) -> dict:
    from cnpipe.dataset import load_output
    from components.registry import stage_command

    env = {**os.environ, "PYTHONPATH": str(benchlib.REPO), "GLOG_minloglevel": "2", "NO_ALBUMENTATIONS_UPDATE": "1"}
    env.pop("CNPIPE_FAMILY", None)
    measured = {}
    root.mkdir(parents=True, exist_ok=True)
    for stage, inputs in DATA_STAGES:
        out = str(root / stage)
        argv = stage_command(stage, config.to_json(), {name: str(root / producer) for name, producer in inputs.items()}, out)
        result = run_measured(argv, env, root / f"{stage}.log")
        output = load_output(out)
        if hasattr(output, "rows_in"):
            result.update(rows_in=output.rows_in, rows_out=output.rows_out)
        else:  # conditioning: one dataset per type
            result.update(rows_in=max(t["rows_in"] for t in output.summary["types"].values()),
                          rows_out={k: t["rows_out"] for k, t in output.summary["types"].items()})
        if stage in stages:
            measured[stage] = result
        print(f"  {stage}: {result}", file=sys.stderr, flush=True)
    return measured


def bomb_comparison(count: int, tmp: pathlib.Path) -> dict:
    """Peaks of the download stage over `count` bomb URLs and over `count` photo URLs (the embedded preset's download
    settings: 8 threads, 1 process), and their ratio."""
    import pipeline_configs
    from cnpipe.dataset import load_output
    from components.registry import stage_command
    from components.laion_retrieval.stage import RETRIEVED_SCHEMA

    kinds = {"photos": ("image/jpeg", benchlib.photo_jpeg()), "bombs": ("image/png", benchlib.png_bomb())}
    server, base = benchlib.serve_files({f"/{kind}/{i}": body for kind, body in kinds.items() for i in range(count)})
    config = pipeline_configs.embedded(str(tmp))
    env = {**os.environ, "PYTHONPATH": str(benchlib.REPO), "NO_ALBUMENTATIONS_UPDATE": "1"}
    env.pop("CNPIPE_FAMILY", None)
    measured = {}
    try:
        for kind, (_, body) in kinds.items():
            ids = [f"{kind}-{i}" for i in range(count)]
            source = benchlib.write_dataset(str(tmp / f"urls-{kind}"), {
                "id": ids, "url": [f"{base}/{kind}/{i}" for i in range(count)], "source_caption": [None] * count,
                "similarity": [1.0] * count, "query": ["bench"] * count, "pwatermark": [None] * count,
                "punsafe": [None] * count}, RETRIEVED_SCHEMA, count, stage="laion_retrieval")
            out = tmp / f"download-{kind}"
            result = run_measured(stage_command("download", config.to_json(), {"retrieved": source.uri}, str(out)), env,
                                  tmp / f"download-{kind}.log")
            manifest = load_output(str(out))
            measured[kind] = {**result, "body_kb": round(len(body) / 1024, 1), "rows_in": manifest.rows_in,
                              "rows_out": manifest.rows_out, "rejections": manifest.rejections}
            print(f"  {kind}: {measured[kind]}", file=sys.stderr, flush=True)
    finally:
        server.shutdown()
    photos, bombs = measured["photos"], measured["bombs"]
    measured["ratio"] = {"max_process": round(bombs["max_process_mib"] / photos["max_process_mib"], 3),
                         "tree": round(bombs["tree_mib"] / photos["tree_mib"], 3)}
    return measured


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=int, default=10, help="the larger run's copies of the seed folder")
    parser.add_argument("--rows-per-shard", type=int, default=8, help="hub_load.rows_per_shard, the same at both scales")
    parser.add_argument("--bombs", type=int, default=0, help="instead: the download stage on N bomb URLs vs N photo URLs")
    args = parser.parse_args(argv)
    if args.bombs:
        with tempfile.TemporaryDirectory(prefix="bench-memory-bombs-") as tmp_name:
            results = bomb_comparison(args.bombs, pathlib.Path(tmp_name))
        print(f"\npeak RSS (MiB) of the download stage, {args.bombs} URLs each")
        benchlib.print_table(["URLs", "body kB", "rows out", "rejections", "process", "tree PSS", "seconds"], [
            [kind, r["body_kb"], r["rows_out"], r["rejections"], r["max_process_mib"], r["tree_mib"], r["seconds"]]
            for kind, r in results.items() if kind != "ratio"])
        print(f"bombs / photos: process {results['ratio']['max_process']}, tree {results['ratio']['tree']}")
        benchlib.write_result("memory_bombs", {"urls": args.bombs, "results": results}, libraries=("img2dataset",))
        return 0

    import pipeline_configs

    assets = benchlib.ensure_assets()
    benchlib.ensure_tiny_models(assets)
    stages = [s for s, _ in DATA_STAGES]
    runs = {}
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp_name:
        tmp = pathlib.Path(tmp_name)
        base = pipeline_configs.embedded(str(assets))
        web, knn_url = start_local_web(assets, base, tmp)
        try:
            for scale in (1, args.scale):
                seeds = scaled_seeds(assets / "seeds", tmp / f"seeds-x{scale}", scale)
                config = pipeline_configs.with_overrides(base, [
                    f"hub_load.source={seeds}", f"hub_load.rows_per_shard={args.rows_per_shard}",
                    f"retrieval.service_url={knn_url}", f"storage.root={tmp}"])
                print(f"[{scale}x] seed folder copied {scale} time(s), {args.rows_per_shard} rows/shard", file=sys.stderr)
                runs[scale] = run_data_half(config, tmp / f"run-x{scale}", stages)
        finally:
            web.terminate()
            web.wait(timeout=30)

    small, large = runs[1], runs[args.scale]
    rows, results = [], {}
    for stage in stages:
        a, b = small[stage], large[stage]
        ratio = {"max_process": round(b["max_process_mib"] / a["max_process_mib"], 3), "tree": round(b["tree_mib"] / a["tree_mib"], 3)}
        results[stage] = {"1x": a, f"{args.scale}x": b, "ratio": ratio, "flat": max(ratio.values()) < 1.5}
        rows.append([stage, f"{a['rows_in']} / {b['rows_in']}", a["max_process_mib"], b["max_process_mib"], ratio["max_process"],
                     a["tree_mib"], b["tree_mib"], ratio["tree"], "yes" if results[stage]["flat"] else "NO"])
    print(f"\npeak RSS (MiB) per data stage, 1x vs {args.scale}x data, {args.rows_per_shard} rows/shard; target ratio < 1.5")
    benchlib.print_table(["stage", "rows in 1x / Nx", "process 1x", "process Nx", "ratio", "tree PSS 1x", "tree PSS Nx", "ratio",
                          "flat"], rows)
    benchlib.write_result("memory", {"scale": args.scale, "rows_per_shard": args.rows_per_shard, "target_ratio": 1.5,
                                     "results": results}, libraries=("kfp",))
    return 0


if __name__ == "__main__":
    sys.exit(main())
