"""Issue 16's measurements of an index you build and host: recall@40 against exact search, build time and peak
memory, index bytes per vector, query latency with 16 concurrent clients against the running service, and the
service's memory against the index's size on disk.

    .venvs/vision/bin/python bench/knn_index.py [--count 200000] [--dim 768] [--budget-bytes-per-vector 136]
                                               [--build-memory 2G] [--clients 16] [--seconds 30]
                                               [--query-time-ms 10] [--serve-nprobe 16 ...] [--work DIR]
                                               [--index-key KEY] [--no-half] [--serve-only]
    --serve-only --work DIR: the index already in DIR/index-<count> measured as served (no build, no re-tune)

What it does:
  1. components.knn_index.synthetic: --count unit vectors in clip-retrieval's layout (float16), from a mixture of
     count/2000 clusters, with 100 queries and 40 planted neighbours each (cosine 0.65-0.95 to their query)
  2. `python -m components.knn_index.build` in the index family's environment: autofaiss chooses the index under
     max_index_memory_usage = count × --budget-bytes-per-vector (136: PQ128 codes + 8-byte ids, LAION's size class)
     and current_memory_available = --build-memory; its time and the peak RSS of the build (process tree, sampled)
  3. exact search (numpy, float32) of the 100 queries over every vector: the true top-40
  4. `python -m components.knn_index.serve` (memory-mapped), queried over HTTP with clip-retrieval's body by
     --clients threads for --seconds, each request on a new connection as ClipClient makes it (bodies encoded
     beforehand): recall@40 of the answers, p50/p99 latency, the service's CPU per query and the clients' (this
     process: on a small machine both share its cores), the service's RSS split into anonymous (its own heap) and
     file-backed (pages of the mapped index: page cache, shared and reclaimable); again at each --serve-nprobe
  5. per million vectors: build time and memory measured at --count and at --count/2 and fitted as
     a + b·n (a: training, fixed for a given index type; b: adding), then b·1M stated beside the measured ones
Results: printed, and bench/results/knn_index.json (--out).
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import pathlib
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import pipeline_configs  # noqa: E402
from components.knn_index import driver, synthetic  # noqa: E402

RESULTS = REPO / "bench" / "results"
K = 40


def env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO)}


def build(source: pathlib.Path, output: pathlib.Path, count: int, bytes_per_vector: int, memory: str,
          query_time_ms: float, index_key: str = "") -> dict:
    driver.ensure_index_environment()
    config = pipeline_configs.embedded("/unused")
    config.index = pipeline_configs.IndexConfig(
        source=str(source), output=str(output), max_index_memory_usage=f"{count * bytes_per_vector // 1024}KB",
        current_memory_available=memory, min_nearest_neighbors_to_retrieve=K, max_index_query_time_ms=query_time_ms,
        index_key=index_key)
    python = str(REPO / ".venvs" / "index" / "bin" / "python")
    started = time.time()
    done = subprocess.run([python, "-m", "components.knn_index.build", "--config-json", config.to_json()],
                          env=env(), cwd=REPO, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"build failed:\n{done.stderr[-4000:]}")
    summary = json.loads((output / "index.json").read_text())
    summary["wall_seconds"] = round(time.time() - started, 1)
    # autofaiss's own phase timings (training, adding, tuning nprobe, measuring), from its log
    summary["phases_seconds"] = {name: float(secs) for name, secs in
                                 re.findall(r'>>> Finished "(?:-> )?([^"]+?)(?: \S*image\.index)?" in ([0-9.]+) secs', done.stderr)}
    return summary


def exact_top(source: pathlib.Path, queries: np.ndarray) -> np.ndarray:
    """The true top-K ids of each query, over the files in the order the index numbers them."""
    best_scores = np.full((len(queries), 0), -np.inf, np.float32)
    best_ids = np.zeros((len(queries), 0), np.int64)
    first = 0
    for path in sorted((source / "img_emb").glob("**/*.npy")):
        block = np.load(path, mmap_mode="r")
        scores = queries @ np.asarray(block, dtype=np.float32).T
        ids = np.broadcast_to(np.arange(first, first + len(block)), scores.shape)
        all_scores = np.concatenate([best_scores, scores], axis=1)
        all_ids = np.concatenate([best_ids, ids], axis=1)
        keep = np.argsort(-all_scores, axis=1)[:, :K]
        best_scores, best_ids = np.take_along_axis(all_scores, keep, 1), np.take_along_axis(all_ids, keep, 1)
        first += len(block)
    return best_ids


def memory_of(pid: int, index: pathlib.Path) -> dict:
    """RSS, split: anonymous (the process's own heap), file-backed (libraries and mapped files), and of those the
    pages of the index folder's files (image.index, metadata/*.arrow) resident now, from /proc/<pid>/smaps."""
    status = dict(line.split(":", 1) for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    kib = {k: int(status[k].split()[0]) * 1024 for k in ("VmRSS", "RssAnon", "RssFile") if k in status}
    mapped, current = 0, False
    folder = str(index.resolve())
    for line in pathlib.Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):  # a mapping's first line
            current = len(head) >= 6 and head[5].startswith(folder)
        elif current and line.startswith("Rss:"):
            mapped += int(head[1]) * 1024
    return {"rss": kib.get("VmRSS", 0), "anon": kib.get("RssAnon", 0), "file": kib.get("RssFile", 0), "index_pages": mapped}


def cpu_seconds_of(pid: int) -> float:
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def serve(index: pathlib.Path, threads: int) -> tuple[subprocess.Popen, int]:
    ready = index.parent / "ready.json"
    ready.unlink(missing_ok=True)
    python = str(REPO / ".venvs" / "vision" / "bin" / "python")
    process = subprocess.Popen([python, "-m", "components.knn_index.serve", "--index", f"bench={index}", "--port", "0",
                                "--threads", str(threads), "--ready-file", str(ready)], env=env(), cwd=REPO)
    deadline = time.time() + 300
    while not ready.exists():
        if process.poll() is not None or time.time() > deadline:
            sys.exit("the service did not start")
        time.sleep(0.2)
    return process, json.loads(ready.read_text())["port"]


def request_body(vector: np.ndarray) -> bytes:
    return json.dumps({"text": None, "image": None, "image_url": None, "embedding_input": vector.tolist(),
                       "deduplicate": False, "use_safety_model": False, "use_violence_detector": False,
                       "indice_name": "bench", "use_mclip": False, "aesthetic_score": 9, "aesthetic_weight": 0.5,
                       "modality": "image", "num_images": K, "num_result_ids": K}).encode()


def query(port: int, body: bytes) -> list[dict]:
    """One request on a new connection, as clip-retrieval's ClipClient makes it (requests.post, no session)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("POST", "/knn-service", body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        answer = json.loads(response.read())
        if response.status != 200:
            raise RuntimeError(answer)
        return answer
    finally:
        conn.close()


def load_test(port: int, bodies: list[bytes], clients: int, seconds: float) -> tuple[list[float], float]:
    """Latencies of `clients` threads each sending one request after another for `seconds` (the bodies encoded
    beforehand: encoding 768 floats is the client's cost, not the service's), and this process's CPU seconds."""
    import resource

    latencies: list[float] = []
    lock = threading.Lock()
    stop = time.time() + seconds
    errors: list[BaseException] = []

    def client(offset: int) -> None:
        i = offset
        try:
            while time.time() < stop:
                start = time.perf_counter()
                query(port, bodies[i % len(bodies)])
                took = time.perf_counter() - start
                with lock:
                    latencies.append(took)
                i += clients
        except Exception as err:  # noqa: BLE001 - a failed request ends the measurement, said below
            errors.append(err)

    usage = resource.getrusage(resource.RUSAGE_SELF)
    workers = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    if errors:
        sys.exit(f"{len(errors)} of {clients} clients failed: {errors[0]!r}")
    after = resource.getrusage(resource.RUSAGE_SELF)
    return latencies, after.ru_utime + after.ru_stime - usage.ru_utime - usage.ru_stime


def measure_service(index: pathlib.Path, queries: np.ndarray, truth: np.ndarray, planted: np.ndarray, args) -> dict:
    """The running service over HTTP: recall@40 of its answers, latency with 1 and with --clients clients, its own
    CPU per query (and the clients', which share the cores here), its memory after loading and after the queries."""
    results: dict = {}
    process, port = serve(index, args.threads)
    try:
        results["service_memory_after_load"] = memory_of(process.pid, index)
        bodies = [request_body(q) for q in queries]
        answers = [[r["id"] for r in query(port, b)] for b in bodies]
        results["recall_at_40"] = float(np.mean([len(set(a) & set(t)) / K for a, t in zip(answers, truth)]))
        results["planted_recall_at_40"] = float(np.mean([len(set(a) & set(p)) / K for a, p in zip(answers, planted)]))
        cpu_before = cpu_seconds_of(process.pid)
        single, _ = load_test(port, bodies, 1, min(10.0, args.seconds))
        single.sort()
        results["service_cpu_ms_per_query_one_client"] = round(1000 * (cpu_seconds_of(process.pid) - cpu_before) / len(single), 2)
        results["latency_ms_one_client"] = {"p50": round(1000 * statistics.median(single), 1),
                                            "p99": round(1000 * single[int(0.99 * (len(single) - 1))], 1)}
        cpu_before = cpu_seconds_of(process.pid)
        latencies, client_cpu = load_test(port, bodies, args.clients, args.seconds)
        latencies.sort()
        # the service's own CPU per answered query: what a pod of n cores serves, whatever else ran here meanwhile;
        # the clients' (this process) share the same cores here
        results["service_cpu_ms_per_query"] = round(1000 * (cpu_seconds_of(process.pid) - cpu_before) / len(latencies), 2)
        results["client_cpu_ms_per_query"] = round(1000 * client_cpu / len(latencies), 2)
        results["requests"] = len(latencies)
        results["latency_ms"] = {"p50": round(1000 * statistics.median(latencies), 1),
                                 "p99": round(1000 * latencies[int(0.99 * (len(latencies) - 1))], 1),
                                 "mean": round(1000 * statistics.fmean(latencies), 1)}
        results["queries_per_second"] = round(len(latencies) / args.seconds, 1)
        results["service_memory_after_queries"] = memory_of(process.pid, index)
        results["load_average"] = os.getloadavg()[0]
    finally:
        process.terminate()
        process.wait(timeout=30)
    return results


def with_nprobe(index: pathlib.Path, nprobe: int, folder: pathlib.Path) -> pathlib.Path:
    """A copy of the index searching `nprobe` lists (efSearch 2·nprobe, as autofaiss sets it), the metadata linked."""
    import faiss

    folder.mkdir(parents=True, exist_ok=True)
    loaded = faiss.read_index(str(index / "image.index"))
    ivf = faiss.extract_index_ivf(loaded)
    ivf.nprobe = nprobe
    hnsw = getattr(faiss.downcast_index(ivf.quantizer), "hnsw", None)
    if hnsw is not None:
        hnsw.efSearch = 2 * nprobe
    faiss.write_index(loaded, str(folder / "image.index"))
    if not (folder / "metadata").exists():
        (folder / "metadata").symlink_to((index / "metadata").resolve())
    return folder


def nprobe_sweep(index: pathlib.Path, queries: np.ndarray, truth: np.ndarray) -> dict:
    """recall@40 and search CPU per query (one thread, in this process) at other nprobe values than autofaiss's."""
    import resource

    import faiss

    from components.laion_retrieval.index import KnnIndex

    def cpu() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    faiss.omp_set_num_threads(1)
    loaded = KnnIndex(str(index))
    ivf = faiss.extract_index_ivf(loaded.index)
    hnsw = getattr(faiss.downcast_index(ivf.quantizer), "hnsw", None)
    sweep = {}
    for nprobe in sorted({4, 8, 16, 32, 64, ivf.nprobe}):
        ivf.nprobe = nprobe
        if hnsw is not None:
            hnsw.efSearch = max(2 * nprobe, 32)
        start = cpu()
        found = [loaded.index.search(q.reshape(1, -1), K)[1][0] for q in queries]
        sweep[nprobe] = {"recall_at_40": round(float(np.mean([len(set(a) & set(t)) / K for a, t in zip(found, truth)])), 4),
                         "search_cpu_ms": round(1000 * (cpu() - start) / len(queries), 2)}
    return sweep


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--budget-bytes-per-vector", type=int, default=136)
    parser.add_argument("--build-memory", default="2G", help="autofaiss's current_memory_available")
    parser.add_argument("--query-time-ms", type=float, default=10.0,
                        help="autofaiss's max_index_query_time_ms: it tunes nprobe to the most that answers within it")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--threads", type=int, default=1, help="faiss threads per query in the service")
    parser.add_argument("--serve-nprobe", type=int, action="append", default=[],
                        help="also measure the service with the index searching this many lists (repeatable)")
    parser.add_argument("--index-key", default="", help="the index type, e.g. one autofaiss chose at a smaller count "
                        "(training then costs the same; empty: autofaiss chooses)")
    parser.add_argument("--out", default="knn_index.json", help="results file under bench/results/")
    parser.add_argument("--no-half", action="store_true", help="skip the build at count/2 (no per-million fit)")
    parser.add_argument("--work", default="", help="folder for the generated set and the index (default: a temporary one)")
    parser.add_argument("--serve-only", action="store_true", help="measure the index already built in --work "
                        "(index-<count>/index.json) without building: recall, latency, service memory")
    args = parser.parse_args()
    if args.serve_only and not (args.work and (pathlib.Path(args.work) / f"index-{args.count}" / "index.json").exists()):
        sys.exit(f"--serve-only measures a built index: {args.work or '--work'}/index-{args.count}/index.json is missing")
    work = pathlib.Path(args.work or tempfile.mkdtemp(prefix="knn-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    results: dict = {"count": args.count, "dim": args.dim, "clients": args.clients, "cpus": os.cpu_count(),
                     "index_key_given": args.index_key,
                     "max_index_query_time_ms": args.query_time_ms,
                     "load_average_at_start": os.getloadavg()[0]}
    try:
        builds = {}
        for n in ([args.count] if args.no_half or args.serve_only else [args.count // 2, args.count]):
            if args.serve_only:
                builds[n] = json.loads((work / f"index-{n}" / "index.json").read_text())
                continue
            source = work / f"set-{n}"
            if not (source / "queries.npy").exists():
                started = time.time()
                synthetic.generate(str(source), n, dim=args.dim, queries=100, neighbours=K)
                print(f"generated {n} vectors of dimension {args.dim} in {time.time() - started:.0f} s", flush=True)
            builds[n] = build(source, work / f"index-{n}", n, args.budget_bytes_per_vector, args.build_memory,
                              args.query_time_ms, args.index_key)
            b = builds[n]
            print(f"built {n}: {b['index_key']} ({b['index_param']}), {b['build_seconds']} s ({b['build_cpu_seconds']} s CPU), peak {b['peak_rss_bytes'] / 2**20:.0f} MiB, "
                  f"{b['bytes_per_vector']} bytes/vector", flush=True)
        full = builds[args.count]
        results["build"] = {n: {k: b.get(k) for k in ("index_key", "index_param", "build_seconds", "build_cpu_seconds", "peak_rss_bytes", "peak_anon_bytes",
                                                   "index_bytes", "bytes_per_vector", "within_budget", "phases_seconds",
                                                   "retune_seconds", "budget_bytes", "over_budget_bytes",
                                                   "memory_plan", "phases_memory")}
                            for n, b in builds.items()}
        results["build_memory_budget"] = args.build_memory
        if len(builds) == 2:
            (n1, b1), (n2, b2) = sorted(builds.items())
            slope_s = (b2["build_seconds"] - b1["build_seconds"]) / (n2 - n1)
            slope_cpu = (b2["build_cpu_seconds"] - b1["build_cpu_seconds"]) / (n2 - n1)
            slope_m = (b2["peak_rss_bytes"] - b1["peak_rss_bytes"]) / (n2 - n1)
            results["per_million_fit"] = {"add_seconds_per_million": round(slope_s * 1e6, 1),
                                          "add_cpu_seconds_per_million": round(slope_cpu * 1e6, 1),
                                          "fixed_cpu_seconds": round(b2["build_cpu_seconds"] - slope_cpu * n2, 1),
                                          "fixed_seconds": round(b2["build_seconds"] - slope_s * n2, 1),
                                          "memory_bytes_per_million": int(slope_m * 1e6),
                                          "fixed_memory_bytes": int(b2["peak_rss_bytes"] - slope_m * n2)}
        results["per_million_measured"] = {"build_seconds": round(full["build_seconds"] * 1e6 / args.count, 1),
                                           "build_cpu_seconds": round(full["build_cpu_seconds"] * 1e6 / args.count, 1),
                                           "peak_rss_bytes": int(full["peak_rss_bytes"] * 1e6 / args.count)}
        phases = full.get("phases_seconds") or {}
        adding = phases.get("Adding the vectors to the index")
        training = next((v for k, v in phases.items() if k.startswith("Training the index")), None)
        if adding is not None and training is not None:
            # autofaiss's own phase times: training is fixed for an index type (it samples its training vectors),
            # adding grows with n: the cost of more vectors at the same index type is adding's rate
            results["phases_extrapolated"] = {"training_seconds": training, "adding_seconds_per_million": round(adding * 1e6 / args.count, 1),
                                              "training_phase": next(k for k in phases if k.startswith("Training the index"))}
        source, index = work / f"set-{args.count}", work / f"index-{args.count}"
        queries = synthetic.load_npy(str(source / "queries.npy"))
        planted = synthetic.load_npy(str(source / "planted.npy"))
        truth = exact_top(source, queries)
        results.update(measure_service(index, queries, truth, planted, args))
        for nprobe in args.serve_nprobe:
            results.setdefault("service_at_nprobe", {})[nprobe] = measure_service(
                with_nprobe(index, nprobe, work / f"index-{args.count}-nprobe{nprobe}"), queries, truth, planted, args)
        results["nprobe_sweep"] = nprobe_sweep(index, queries, truth)
        on_disk = (index / "image.index").stat().st_size + sum(p.stat().st_size for p in (index / "metadata").iterdir())
        results["index_on_disk_bytes"] = on_disk
        results["load_average_at_end"] = os.getloadavg()[0]
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / args.out).write_text(json.dumps(results, indent=1, default=str))
    mem, disk = results["service_memory_after_queries"], results["index_on_disk_bytes"]
    print(json.dumps(results, indent=1, default=str))
    print(f"\nrecall@40 {results['recall_at_40']:.3f} (planted {results['planted_recall_at_40']:.3f}); "
          f"p50 {results['latency_ms']['p50']} ms, p99 {results['latency_ms']['p99']} ms with {args.clients} clients "
          f"({results['service_cpu_ms_per_query']} ms of service CPU and {results['client_cpu_ms_per_query']} ms of client CPU per "
          f"query on {os.cpu_count()} cores; load average {results['load_average_at_end']:.1f}); "
          f"service RSS {mem['rss'] / 2**20:.0f} MiB ({mem['anon'] / 2**20:.0f} MiB its own heap, {mem['file'] / 2**20:.0f} MiB "
          f"file-backed, of which {mem['index_pages'] / 2**20:.1f} MiB pages of the index) for {disk / 2**20:.1f} MiB of index on disk")


if __name__ == "__main__":
    main()
