"""The build's memory planned before any work, from what autofaiss 2.18's build really holds (read in its code and
measured), and the three places where autofaiss is told what that plan decided. Runs in the index family's
environment (autofaiss, faiss).

What autofaiss budgets and what it misses (current_memory_available, autofaiss 2.18.0, embedding_reader 1.7):
  * training sample: get_optimal_train_size means to take 31..100 vectors per IVF list as memory allows, but sizes
    the memory for 100 *vectors* instead of 100 per list, so it always takes 100 per list (102 400 for IVF1024),
    while estimate_memory_required_for_index_creation checks the budget for 31 per list: its check is 3x short
    for training. The plan takes the most per list (100 down to 31) whose training memory fits.
  * adding: get_optimal_batch_size makes a batch of (budget - index)/(4·dim) float32 vectors, at most 1 GB; but
    autofaiss's loop (`for ..., (vec_batch, ...) in enumerate(reader)`) still holds the previous batch while the
    reader fills the next (two batches), and faiss's OPQ
    pre-transform holds a batch × out_dim float32 copy. The plan sizes the batch for 8·dim + 4·out_dim bytes a vector.
  * reading: embedding_reader reads up to 50 pieces of 50 MB ahead of the consumer (max_ram_usage_in_bytes 4 GB
    by default): while faiss adds a batch it reads most of a 10^6 float16 set (1.5 GB). The plan bounds it to
    READ_AHEAD_PIECES pieces.
  * OPQ training: autofaiss counts 4·(dim + 2·out_dim) bytes per point OPQ trains on; faiss's OPQMatrix.train
    takes 4·(3·dim + out_dim) and a copy of its 65 536-point subsample (measured: opq_training_bytes).
  * none of it counts the process itself (Python, faiss, autofaiss: ~150 MB), which the plan measures.

    python -m components.knn_index.budget --count 1000000 --dim 768 --budget 2G --max-index 130MB [--index-key K]
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import re
import sys
from unittest import mock

from components.knn_index.memory import human, parse_size

PIECE_BYTES = 50 * 10**6  # embedding_reader's largest piece
READ_AHEAD_PIECES = 2  # pieces read ahead of the consumer (embedding_reader's default: up to 50)
OPQ_MAX_TRAIN_POINTS = 256 * 256  # faiss OPQMatrix.max_train_points: it trains on a subsample of this many
FAISS_ADD_BLOCK = 65536  # faiss IndexIVF adds in blocks of this many vectors (residuals, list numbers, codes)
MOST_POINTS_PER_LIST, FEWEST_POINTS_PER_LIST = 100, 31  # autofaiss's (and faiss's k-means) range
FEWEST_IN_A_BATCH = 1000
MOST_BATCH_BYTES = 10**9  # autofaiss: "using more than 1GB of ram is not faster here"
# the share of the budget the plan fills: the rest is left for what the model does not count (allocator slack,
# faiss's smaller buffers, Python objects made on the way)
PLANNED_SHARE = 0.9


class BudgetError(ValueError):
    """The build cannot fit the memory it is given: said before any work."""


@dataclasses.dataclass
class Plan:
    index_key: str
    count: int
    dim: int
    budget: int  # current_memory_available, bytes
    baseline: int  # the build process before autofaiss starts (measured RSS)
    index_bytes: int  # autofaiss's estimate of the finished index
    train_size: int  # vectors sampled to train (0: the index needs no training)
    training_peak: int  # planned peak while training (baseline included)
    batch_size: int  # vectors added per batch
    adding_peak: int  # planned peak while adding (baseline included)
    read_ahead_bytes: int
    skipped: list[str] = dataclasses.field(default_factory=list)  # autofaiss's better candidates that did not fit

    @property
    def peak(self) -> int:
        return max(self.training_peak, self.adding_peak)

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "peak": self.peak}


def transformed_dim(index_key: str, dim: int) -> int:
    """The dimension faiss adds and trains the IVF in: OPQm_d's d, Padd's d, else the vectors' own."""
    match = re.match(r"(?:OPQ\d+_(\d+)|Pad(\d+)),", index_key)
    return int(next(g for g in match.groups() if g)) if match else dim


def opq_training_bytes(index_key: str, train_size: int, dim: int) -> int:
    """The training sample and what faiss 1.13's OPQMatrix.train holds beside it: a subsample copy of
    OPQ_MAX_TRAIN_POINTS vectors when the sample is larger, and 4·(3·dim + out_dim) bytes per point it trains on
    (its projections, reconstructions and rotation products). Measured (`bench/knn_build_memory.py`): 708 MiB for
    65 536 points of 768 -> 448, where autofaiss's formula counts 4·(dim + 2·out_dim) per point (429 MiB).
    0 for an index without OPQ."""
    if not index_key.startswith("OPQ"):
        return 0
    out_dim = transformed_dim(index_key, dim)
    points = min(train_size, OPQ_MAX_TRAIN_POINTS)
    subsample = 4 * dim * points if train_size > OPQ_MAX_TRAIN_POINTS else 0
    return 4 * dim * train_size + subsample + 4 * points * (3 * dim + out_dim)


def plan_key(index_key: str, count: int, dim: int, budget: int, baseline: int) -> Plan:
    """The plan for one index type, or BudgetError saying which phase does not fit and by how much."""
    from autofaiss.external.metadata import IndexMetadata
    from autofaiss.external.optimize import check_if_index_needs_training, index_key_to_nb_cluster

    metadata = IndexMetadata(index_key, count, dim, False)
    index_bytes = int(metadata.estimated_index_size_in_bytes())
    read_ahead = READ_AHEAD_PIECES * PIECE_BYTES  # max_ram_usage_in_bytes: whole pieces, at least one
    planned = int(budget * PLANNED_SHARE)
    room = planned - baseline
    train_size, training_peak = 0, baseline
    if check_if_index_needs_training(index_key):
        lists = index_key_to_nb_cluster(index_key)
        for per_list in range(MOST_POINTS_PER_LIST, FEWEST_POINTS_PER_LIST - 1, -1):  # the most that fits
            train_size = min(per_list * lists, count)
            # autofaiss's own training formula at the sample it really trains on, or where OPQ is trained what
            # faiss's OPQMatrix.train measurably takes (larger), and the reader's pieces
            training = max(metadata.compute_memory_necessary_for_training(train_size),
                           opq_training_bytes(index_key, train_size, dim))
            training_peak = baseline + int(training) + read_ahead
            if training_peak <= planned:
                break
        else:
            raise BudgetError(f"{index_key}: training on {train_size} vectors ({FEWEST_POINTS_PER_LIST} per list, the "
                              f"fewest k-means takes) needs {human(training_peak)}, over {human(planned)} "
                              f"({PLANNED_SHARE:.0%} of {human(budget)})")
    out_dim = transformed_dim(index_key, dim)
    code_bytes = int(metadata.params.get("pq", 0) * metadata.params.get("nbits", 8) / 8)
    block = FAISS_ADD_BLOCK * (4 * out_dim + code_bytes + 16)
    fixed = index_bytes + read_ahead + block
    # the batch being added, the one being read, the OPQ/Pad output: an upper bound (the output is freed before
    # the next read ends; at 10^6 the adding phase measured 1578 MiB where this plans 1843 MiB)
    two_batches = 2 * 4 * dim + 4 * out_dim
    batch = min((room - fixed) // two_batches, MOST_BATCH_BYTES // (4 * dim))
    if batch >= count:  # one batch: nothing is read while it is added
        batch = count
    if batch < min(FEWEST_IN_A_BATCH, count):
        raise BudgetError(f"{index_key}: adding needs {human(baseline + fixed + FEWEST_IN_A_BATCH * two_batches)} "
                          f"(the index {human(index_bytes)}, the process {human(baseline)}), over {human(planned)} "
                          f"({PLANNED_SHARE:.0%} of {human(budget)})")
    per_vector = two_batches if batch < count else 4 * dim + 4 * out_dim
    adding_peak = baseline + fixed + batch * per_vector
    return Plan(index_key, count, dim, budget, baseline, index_bytes, train_size, training_peak, int(batch),
                int(adding_peak), read_ahead)


def plan(count: int, dim: int, budget: int, baseline: int, max_index_memory_usage: str,
         index_key: str = "") -> Plan:
    """The index type given, or else the first of autofaiss's own candidates (best first, memory-mappable) whose
    build fits `budget`; BudgetError with every candidate's reason when none does."""
    from autofaiss.external.optimize import get_optimal_index_keys_v2

    keys = [index_key] if index_key else get_optimal_index_keys_v2(count, dim, max_index_memory_usage,
                                                                     should_be_memory_mappable=True)
    if not keys:
        raise BudgetError(f"autofaiss has no index type of at most {max_index_memory_usage} for {count} vectors")
    skipped = []
    for key in dict.fromkeys(keys):
        try:
            chosen = plan_key(key, count, dim, budget, baseline)
        except BudgetError as err:
            skipped.append(str(err))
            continue
        chosen.skipped = skipped
        return chosen
    suggestion = fewer_lists(keys[0], count, dim, budget, baseline)
    raise BudgetError("no index type fits the build memory: " + "; ".join(skipped) +
                      ". Raise index.current_memory_available, or give index.index_key with fewer lists" +
                      (f": {suggestion.index_key} fits (planned peak {human(suggestion.peak)})" if suggestion else ""))


def fewer_lists(index_key: str, count: int, dim: int, budget: int, baseline: int) -> Plan | None:
    """autofaiss's first choice with the most IVF lists (halving) whose build fits, to name in the refusal: fewer
    lists train on fewer vectors (31..100 per list), at some cost in recall per nprobe; None if none does."""
    match = re.search(r"IVF(\d+)", index_key)
    lists = int(match.group(1)) // 2 if match else 0
    while lists >= 64:
        try:
            return plan_key(index_key.replace(match.group(0), f"IVF{lists}", 1), count, dim, budget, baseline)
        except BudgetError:
            lists //= 2
    return None


def bounded_reader(reader_class, read_ahead: int):
    """embedding_reader.EmbeddingReader reading at most `read_ahead` bytes ahead of its consumer."""

    class BoundedReader(reader_class):
        def __call__(self, *args, **kwargs):
            kwargs.setdefault("max_ram_usage_in_bytes", read_ahead)
            return super().__call__(*args, **kwargs)

    return BoundedReader


AUTOFAISS_VERSION = "2.18.0"  # the version whose names and behaviour autofaiss_within was written for


@contextlib.contextmanager
def autofaiss_within(chosen: Plan):
    """While autofaiss's build_index runs: its training sample, add batch and reader's read-ahead are the plan's
    (looked up by these names in autofaiss 2.18.0, pinned in envs/index.in; another version is refused, since
    the patched names would no longer be where the sizes are decided)."""
    from autofaiss.external import quantize
    from autofaiss.indices import build as add_module
    from autofaiss.indices import training
    from autofaiss.version import __version__

    if __version__ != AUTOFAISS_VERSION:
        raise RuntimeError(f"components/knn_index/budget.py was written for autofaiss {AUTOFAISS_VERSION}, not "
                           f"{__version__}: check where it sizes the training sample and the add batch")
    with mock.patch.object(training, "get_optimal_train_size", lambda *a, **k: chosen.train_size), \
            mock.patch.object(add_module, "get_optimal_batch_size", lambda *a, **k: chosen.batch_size), \
            mock.patch.object(quantize, "EmbeddingReader", bounded_reader(quantize.EmbeddingReader, chosen.read_ahead_bytes)):
        yield


def process_rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--dim", type=int, required=True)
    parser.add_argument("--budget", required=True, help="current_memory_available, e.g. 2G")
    parser.add_argument("--max-index", default="16G", help="max_index_memory_usage")
    parser.add_argument("--index-key", default="")
    parser.add_argument("--baseline", default="", help="the process's own memory (default: this one's, measured)")
    args = parser.parse_args(argv)
    import autofaiss  # noqa: F401 - the baseline is measured with autofaiss and faiss loaded, as in a build

    baseline = parse_size(args.baseline) if args.baseline else process_rss()
    try:
        chosen = plan(args.count, args.dim, parse_size(args.budget), baseline, args.max_index, args.index_key)
    except BudgetError as err:
        print(json.dumps({"error": str(err)}))
        return 2
    print(json.dumps(chosen.as_dict(), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
