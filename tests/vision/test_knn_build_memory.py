"""Issue 16, the index build within the memory it is given: the plan (components/knn_index/budget.py) sizes the
training sample and the add batch from what autofaiss's build really holds, refuses before any work a budget that
cannot fit, and the build records its measured peak (per autofaiss phase) beside the budget."""
from __future__ import annotations

import json
import os
import re
import subprocess

from cnpipe.families import REPO_ROOT
from components.knn_index import synthetic
from tests.vision.test_knn_index import build, index_python

MB = 2**20
KEY = "OPQ64_448,IVF1024_HNSW32,PQ64x8"


def plan(*args: str) -> tuple[int, dict]:
    done = subprocess.run([index_python(), "-m", "components.knn_index.budget", *args], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, cwd=REPO_ROOT, timeout=120)
    return done.returncode, json.loads(done.stdout)


def test_add_batch_counts_two_batches_and_the_opq_output():
    code, got = plan("--count", "1000000", "--dim", "768", "--budget", "2G", "--index-key", KEY, "--baseline", "150MB")
    assert code == 0, got
    assert got["index_key"] == KEY and got["train_size"] == 100 * 1024  # the budget takes faiss's 100 per list
    # what stays while adding: the process, the index, the reader's read-ahead and faiss's add block of 65536
    fixed = 150 * MB + got["index_bytes"] + got["read_ahead_bytes"] + 65536 * (4 * 448 + 64 + 16)
    per_vector = 2 * 4 * 768 + 4 * 448  # the batch being added, the next one being read, OPQ's 448-d output
    assert got["batch_size"] == (int(0.9 * 2 * 2**30) - fixed) // per_vector
    assert got["adding_peak"] <= 0.9 * 2 * 2**30 < got["adding_peak"] + per_vector
    # autofaiss alone would have added (2G - index) / (4·768) vectors at a time, at most 1 GB: twice as many
    assert got["batch_size"] < min(2 * 2**30 - got["index_bytes"], 10**9) // (4 * 768) / 1.5


def test_a_tighter_budget_trains_on_fewer_vectors_per_list():
    code, roomy = plan("--count", "120000", "--dim", "768", "--budget", "2G", "--index-key", KEY, "--baseline", "150MB")
    code_tight, tight = plan("--count", "120000", "--dim", "768", "--budget", "1G", "--index-key", KEY,
                             "--baseline", "150MB")
    assert code == code_tight == 0
    assert roomy["train_size"] == 102400
    assert 31 * 1024 <= tight["train_size"] < 102400 and tight["training_peak"] <= 0.9 * 2**30

    def training(n: int) -> int:  # the process, the reader's pieces, the sample, OPQ's products (n < 65536)
        return 150 * MB + tight["read_ahead_bytes"] + 4 * 768 * n + 4 * n * (3 * 768 + 448)

    most = next(per_list * 1024 for per_list in range(100, 30, -1) if training(per_list * 1024) <= 0.9 * 2**30)
    assert tight["train_size"] == most and tight["training_peak"] == training(most)


def test_autofaiss_choice_that_cannot_train_within_the_budget_is_refused_with_each_reason():
    # at 10^6 autofaiss prefers 16384 lists and more: even 31 vectors per list (507 904) do not train in 2 GB
    code, got = plan("--count", "1000000", "--dim", "768", "--budget", "2G", "--max-index", "132812KB",
                     "--baseline", "150MB")
    assert code == 2
    assert "OPQ64_448,IVF16384_HNSW32,PQ64x8: training on 507904 vectors" in got["error"]
    assert "Raise index.current_memory_available" in got["error"]
    # and it names autofaiss's first choice with the most lists that does fit, which then plans within the budget
    suggested = re.search(r"fewer lists: (\S+) fits", got["error"]).group(1)
    assert suggested == "OPQ64_448,IVF4096_HNSW32,PQ64x8", got["error"]
    code, fits = plan("--count", "1000000", "--dim", "768", "--budget", "2G", "--baseline", "150MB", "--index-key", suggested)
    assert code == 0 and fits["peak"] <= 0.9 * 2 * 2**30


def test_an_impossible_budget_is_refused_before_any_work(tmp_path):
    source = tmp_path / "set"
    synthetic.generate(str(source), 4000, dim=64, queries=2, neighbours=4, rows_per_file=2000)
    out = tmp_path / "index"
    done = build(str(source), str(out), current_memory_available="120MB")
    assert done.returncode == 2, done.stderr[-2000:]
    assert "no index type fits the build memory" in done.stderr and "120.0 MiB" in done.stderr
    assert not out.exists() or not any(out.iterdir())  # no metadata, no index: refused before the work


def test_a_build_records_its_measured_peak_per_phase_against_the_budget(tmp_path):
    source = tmp_path / "set"
    synthetic.generate(str(source), 12000, dim=64, queries=2, neighbours=4, rows_per_file=4000)
    out = tmp_path / "index"
    done = build(str(source), str(out), current_memory_available="700MB", index_key="IVF64,Flat")
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "index.json").read_text())
    assert summary["budget_bytes"] == 700 * MB  # autofaiss's binary units
    plan_ = summary["memory_plan"]
    assert plan_["index_key"] == summary["index_key"] == "IVF64,Flat" and plan_["train_size"] == 6400
    phases = summary["phases_memory"]
    assert {"Training the index", "Adding the vectors to the index", "writing metadata"} <= set(phases)
    # the whole build's peak is the largest of its phases', and the plan's baseline was measured below it
    assert summary["peak_rss_bytes"] == max(p["peak_rss_bytes"] for p in phases.values())
    assert plan_["baseline"] < phases["Training the index"]["peak_rss_bytes"] <= summary["peak_rss_bytes"]
    assert summary["within_budget"] == (summary["peak_rss_bytes"] <= 700 * MB) and summary["over_budget_bytes"] == 0
    assert "memory plan: IVF64,Flat, training on 6400 vectors" in done.stderr
