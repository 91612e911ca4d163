"""Where a kNN index build's memory goes, measured in parts that run in seconds (the index family's environment):

    .venvs/index/bin/python bench/knn_build_memory.py opq [--points 65536 102400] [--dim 768] [--out-dim 448]
        faiss OPQMatrix.train's memory beside its training sample (one iteration: it allocates everything in the
        first), against autofaiss's formula for it and components/knn_index/budget.py's opq_training_bytes
    .venvs/index/bin/python bench/knn_build_memory.py reader --embeddings DIR [--batch 325520] [--read-ahead 0]
        embedding_reader reading batches for a slow consumer, as autofaiss's add loop does: the peak RSS with its
        default read-ahead (0) or max_ram_usage_in_bytes = --read-ahead
    .venvs/index/bin/python bench/knn_build_memory.py phases INDEX_FOLDER
        the peak RSS and anonymous memory of each autofaiss phase of a build (index.json), beside its plan
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import threading
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

MIB = 2**20


class Peak:
    """This process's largest RSS, sampled every 20 ms in a thread."""

    def __init__(self):
        import psutil

        self.process, self.bytes = psutil.Process(), 0
        threading.Thread(target=self._watch, daemon=True).start()

    def now(self) -> int:
        return self.process.memory_info().rss

    def _watch(self) -> None:
        while True:
            self.bytes = max(self.bytes, self.now())
            time.sleep(0.02)


def opq(args) -> None:
    import faiss
    import numpy as np
    from autofaiss.external.metadata import IndexMetadata

    from components.knn_index.budget import opq_training_bytes

    faiss.omp_set_num_threads(1)
    key = f"OPQ64_{args.out_dim},IVF1024_HNSW32,PQ64x8"
    for points in args.points:
        peak = Peak()
        x = np.random.default_rng(0).standard_normal((points, args.dim), dtype=np.float32)
        time.sleep(0.2)
        before = peak.now()
        peak.bytes = before
        matrix = faiss.OPQMatrix(args.dim, 64, args.out_dim)
        matrix.niter, matrix.niter_pq = 1, 1
        matrix.train(x)
        time.sleep(0.2)
        metadata = IndexMetadata(key, points, args.dim)
        print(json.dumps({"points": points, "measured_beside_sample_mib": round((peak.bytes - before) / MIB),
                          "autofaiss_opq_formula_mib": round(metadata._get_opq_training_memory_usage_in_bytes(points) / MIB),  # noqa: SLF001
                          "planned_beside_sample_mib": round((opq_training_bytes(key, points, args.dim) - 4 * args.dim * points) / MIB)}))
        del x, matrix


def reader(args) -> None:
    from embedding_reader import EmbeddingReader

    peak = Peak()
    read = EmbeddingReader(args.embeddings, file_format="npy")
    kwargs = {"max_ram_usage_in_bytes": args.read_ahead} if args.read_ahead else {}
    start = peak.now()
    for _, (batch, _) in enumerate(read(batch_size=args.batch, show_progress=False, **kwargs)):
        time.sleep(args.consumer_seconds)  # faiss adding the batch
    print(json.dumps({"count": int(read.count), "batch": args.batch, "batch_mib": round(args.batch * read.dimension * 4 / MIB),
                      "read_ahead": args.read_ahead or "default (4 GB: up to 50 pieces)",
                      "peak_beside_process_mib": round((peak.bytes - start) / MIB)}))


def phases(args) -> None:
    summary = json.loads((pathlib.Path(args.index) / "index.json").read_text())
    print(f"{summary['index_key']}: {summary['count']} vectors, budget {summary['budget_bytes'] / MIB:.0f} MiB, "
          f"peak {summary['peak_rss_bytes'] / MIB:.0f} MiB ({summary['peak_anon_bytes'] / MIB:.0f} anonymous)")
    plan = summary.get("memory_plan", {})
    print(f"plan: training {plan.get('train_size')} vectors {plan.get('training_peak', 0) / MIB:.0f} MiB, adding "
          f"{plan.get('batch_size')} a batch {plan.get('adding_peak', 0) / MIB:.0f} MiB, process {plan.get('baseline', 0) / MIB:.0f} MiB")
    for name, seen in summary.get("phases_memory", {}).items():
        print(f"  {seen['peak_rss_bytes'] / MIB:7.0f} MiB RSS {seen['peak_anon_bytes'] / MIB:7.0f} MiB anon  {name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="part", required=True)
    p = sub.add_parser("opq")
    p.add_argument("--points", type=int, nargs="+", default=[65536, 102400])
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--out-dim", type=int, default=448)
    p = sub.add_parser("reader")
    p.add_argument("--embeddings", required=True, help="a folder of .npy files (clip-retrieval's img_emb)")
    p.add_argument("--batch", type=int, default=325520, help="autofaiss's batch at a 2 GB budget, 768 dimensions")
    p.add_argument("--read-ahead", type=int, default=0)
    p.add_argument("--consumer-seconds", type=float, default=4.0)
    p = sub.add_parser("phases")
    p.add_argument("index")
    args = parser.parse_args()
    {"opq": opq, "reader": reader, "phases": phases}[args.part](args)


if __name__ == "__main__":
    main()
