"""The loop every per-row stage shares: input shards in, output shards committed one by one.

A stage supplies `process(shard_table) -> ShardResult`; this module handles resume (committed
shards are skipped), accounting (rows in = rows out + rows rejected) and progress.
"""
from __future__ import annotations

from typing import Callable, Sequence

import pyarrow as pa

from cnpipe import storage
from cnpipe.dataset import Manifest, ShardedOutput, ShardResult
from cnpipe.progress import bar


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
) -> Manifest:
    output = ShardedOutput(output_uri, stage, config_hash, schema)
    plan = shard_plan(inputs)
    todo = [p for p in plan if not output.is_done(p[0])]
    progress = bar(stage, total=sum(rows for *_, rows in todo))
    progress.set_postfix_str(f"{len(plan) - len(todo)}/{len(plan)} shards already done", refresh=False)
    for out_name, manifest, in_name, rows in todo:
        table = storage.read_parquet(storage.join(manifest.uri, "data", f"{in_name}.parquet"), columns=columns)
        result = process(table, manifest)
        output.commit(out_name, result, rows_in=table.num_rows)
        progress.update(rows)
    progress.close()
    return output.finalize([p[0] for p in plan], inputs=[m.uri for m in inputs])
