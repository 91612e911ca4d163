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
    """Run a command under /usr/bin/time; return its wall time, max single-process RSS and peak tree PSS."""
    report = log.with_suffix(".time")
    peak = [0]
    with open(log, "wb") as out:
        process = subprocess.Popen(["/usr/bin/time", "-f", "%M", "-o", str(report), *argv], env=env, stdout=out,
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
    max_process = int(report.read_text().strip().splitlines()[-1])
    return {"seconds": round(seconds, 2), "max_process_mib": round(max_process / 1024, 1), "tree_mib": round(peak[0] / 1024, 1)}


def scaled_seeds(seeds: pathlib.Path, target: pathlib.Path, scale: int) -> pathlib.Path:
    """`scale` copies of the seed folder side by side (distinct paths, so distinct ids)."""
    for copy in range(scale):
        shutil.copytree(seeds, target / f"copy-{copy:03d}")
    return target


def start_local_web(assets: pathlib.Path, config, tmp: pathlib.Path):
    """The embedded loopback web + kNN service, as cnpipe/local_run.py starts it."""
    from cnpipe.families import family_python

    ready = tmp / "local_web.json"
    web, info = benchlib.start_server(
        [family_python("vision"), "-m", "cnpipe.embedded.local_web", "--assets", str(assets), "--clip-model",
         config.clip_embed.model, "--indice-name", config.retrieval.indice_name, "--ready-file", str(ready)],
        ready, "the embedded web/kNN service", timeout_s=300,
        env={**os.environ, "PYTHONPATH": str(benchlib.REPO)}, cwd=benchlib.REPO, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)
    return web, info["knn_url"]


def run_data_half(config, root: pathlib.Path, stages: list[str]) -> dict:
    from cnpipe.dataset import load_output
    from cnpipe.families import stage_command

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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=int, default=10, help="the larger run's copies of the seed folder")
    parser.add_argument("--rows-per-shard", type=int, default=8, help="hub_load.rows_per_shard, the same at both scales")
    args = parser.parse_args(argv)

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
