"""The loop every per-row stage shares: input shards in, output shards committed one by one.

A stage supplies `process(shard_table) -> ShardResult`; this module handles resume (committed
shards are skipped), accounting (rows in = rows out + rows rejected) and progress.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, ContextManager, Sequence

import pyarrow as pa

from cnpipe import storage
from cnpipe.dataset import Manifest, ShardedOutput, ShardResult, StageOutput
from cnpipe.progress import bar

# (index, count) when this process is one of `count` shard groups of a fanned-out stage (kfp ParallelFor):
# it processes every count-th shard and leaves the manifest to the final, unpartitioned pass.
_part: tuple[int, int] | None = None


class ShardNotFinal(Exception):
    """Raised by a shard's result when it must not be committed yet (download: too many of its URLs failed
    transiently); the message says why. The other shards are committed, then the stage fails naming it."""


class ShardsNotFinal(RuntimeError):
    """Shards left uncommitted (ShardNotFinal), after every other shard was committed: a rerun redoes only them."""


def set_part(index: int, count: int) -> None:
    global _part
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"shard group {index} of {count} does not exist")
    _part = (index, count) if count > 1 else None


def my_part(plan: list) -> list:
    """The shards of the plan this process owns: all of them unless it is one shard group of several."""
    if _part is None:
        return plan
    index, count = _part
    return [p for i, p in enumerate(plan) if i % count == index]


def written_shards(mine: list) -> list[str] | None:
    """The shards a ShardedOutput of this process may clean up after: its own when it is one of several shard
    groups running at once, all (None) otherwise."""
    return None if _part is None else [p[0] for p in mine]


def partial_output(uri: str, plan: list, mine: list) -> StageOutput | None:
    """What a shard-group pass returns (no manifest: the final pass writes it), or None when not partitioned."""
    if _part is None:
        return None
    return StageOutput(uri, {"part": _part[0], "parts": _part[1], "shards": len(mine), "shards_total": len(plan)})


def shard_plan(inputs: Sequence[Manifest]) -> list[tuple[str, Manifest, str, int]]:
    """(output shard name, input manifest, input shard name, rows) for every input shard.

    With several inputs, output names carry the input's stage so they never collide.
    """
    plan = []
    for manifest in inputs:
        for shard in manifest.shards:
            name = shard["name"] if len(inputs) == 1 else f"{manifest.stage}-{shard['name']}"
            plan.append((name, manifest, shard["name"], shard["rows"]))
    return plan


def run_per_shard(
    stage: str,
    inputs: Sequence[Manifest],
    output_uri: str,
    config_hash: str,
    schema: pa.Schema,
    process: Callable[[pa.Table, Manifest], ShardResult],
    columns: list[str] | None = None,
) -> "Manifest | StageOutput":
    return run_in_batches(stage, inputs, output_uri, config_hash, schema,
                          lambda batch: [process(table, manifest) for table, manifest in batch], 0, columns)


def run_in_batches(
    stage: str,
    inputs: Sequence[Manifest],
    output_uri: str,
    config_hash: str,
    schema: pa.Schema,
    process_batch: Callable[[list[tuple[pa.Table, Manifest]]], list[ShardResult]],
    batch_rows: int,
    columns: list[str] | None = None,
) -> "Manifest | StageOutput":
    """run_per_shard for stages whose work has a fixed cost per call: consecutive unfinished shards are handed
    over together, up to `batch_rows` rows (0: one shard at a time), and each shard is still committed on its own.
    A kill loses the batch in progress, never a committed shard."""
    def start(_, batch: list) -> list[Callable[[], ShardResult]]:
        results: list[ShardResult] = []

        def result(index: int) -> ShardResult:  # the batch's work runs when its first result is asked for
            if not results:
                results.extend(process_batch(batch))
                if len(results) != len(batch):
                    raise RuntimeError(f"{stage}: {len(results)} results for a batch of {len(batch)} shards")
            return results[index]

        return [functools.partial(result, i) for i in range(len(batch))]

    return run_pipelined(stage, inputs, output_uri, config_hash, schema, start, batch_rows, columns)


def run_pipelined(
    stage: str,
    inputs: Sequence[Manifest],
    output_uri: str,
    config_hash: str,
    schema: pa.Schema,
    start_batch: Callable[[Any, list[tuple[pa.Table, Manifest]]], list[Callable[[], ShardResult]]],
    batch_rows: int,
    columns: list[str] | None = None,
    worker: Callable[[], ContextManager] = contextlib.nullcontext,
) -> "Manifest | StageOutput":
    """run_in_batches for stages whose work runs elsewhere (download's worker processes): `start_batch(worker,
    batch)` starts a batch and returns, per shard, the call that waits for its result. The next batch is read
    and started before the last one is committed, and each shard is committed as soon as its result is in, so
    the workers never wait on a commit. `worker()` is entered only when there is work left (a rerun that finds
    every shard done starts nothing) and left once the last batch is started, so that it winds down while that
    batch is committed. A kill loses the batches in flight (two at most), never a committed shard."""
    plan = shard_plan(inputs)
    mine = my_part(plan)
    output = ShardedOutput(output_uri, stage, config_hash, schema, written_shards(mine))
    todo = [p for p in mine if not output.is_done(p[0])]
    progress = bar(stage, total=sum(rows for *_, rows in todo))
    progress.set_postfix_str(f"{len(mine) - len(todo)}/{len(mine)} shards already done", refresh=False)

    not_final: list[str] = []

    def commit(batch, tables, results) -> None:
        if len(results) != len(batch):
            raise RuntimeError(f"{stage}: {len(results)} results for a batch of {len(batch)} shards")
        for (out_name, *_, rows), (table, _), result in zip(batch, tables, results):
            try:
                output.commit(out_name, result(), rows_in=table.num_rows)
            except ShardNotFinal as err:
                not_final.append(f"{out_name} ({err})")
            progress.update(rows)

    in_flight = None
    if todo:
        with worker() as running:
            for batch in _batches(todo, batch_rows):
                tables = [(storage.read_parquet(storage.join(m.uri, "data", f"{in_name}.parquet"), columns=columns), m)
                          for _, m, in_name, _ in batch]
                started = (batch, tables, start_batch(running, tables))
                if in_flight:
                    commit(*in_flight)
                in_flight = started
    if in_flight:
        commit(*in_flight)
    progress.close()
    if not_final:
        raise ShardsNotFinal(f"{stage}: {len(not_final)} shard(s) not committed: {'; '.join(not_final)}. Every other "
                             "shard is committed; rerun with the same run id (or let the task retry) to redo only these.")
    return partial_output(output_uri, plan, mine) or output.finalize([p[0] for p in plan], inputs=[m.uri for m in inputs])


def _batches(todo: list, batch_rows: int):
    batch, rows = [], 0
    for item in todo:
        if batch and rows + item[3] > batch_rows:
            yield batch
            batch, rows = [], 0
        batch.append(item)
        rows += item[3]
    if batch:
        yield batch
