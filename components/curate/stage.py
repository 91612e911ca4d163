"""curate: the dataset conditioning reads, shard by shard (in shard groups): every input row, less those that failed a
per-row filter (curate_keys' verdict) or that the global pass found to duplicate a kept row (curate_dedup's
decisions), plus `clip_similarity` (caption vs image). Each rejected row carries its reason; a dropped duplicate's
detail names the row kept in its place. No model, no image decoding: the core family runs it.
"""
from __future__ import annotations

import sys

import pyarrow as pa

from cnpipe import storage
from cnpipe.dataset import ContractError, Manifest, Reject, ShardedOutput, ShardResult, StageOutput
from cnpipe.progress import bar
from cnpipe.stage import my_part, partial_output, shard_plan, written_shards
from components.curate import settings

STAGE = "curate"


def curate_shard(table: pa.Table, keys: pa.Table, decisions: pa.Table | None) -> ShardResult:
    ids = table.column("id").to_pylist()
    if keys.column("id").to_pylist() != ids:
        raise ContractError(f"{STAGE}: curate_keys' shard does not hold the rows of its images shard, in order "
                            "(was it made from another input? rerun curate_keys with a new run id)")
    dropped = {}
    if decisions is not None:
        dropped = {i: (r, d) for i, r, d in zip(decisions.column("id").to_pylist(), decisions.column("reason").to_pylist(),
                                                   decisions.column("detail").to_pylist())}
    rejects, keep = [], []
    for row_id, reason, detail in zip(ids, keys.column("reason").to_pylist(), keys.column("detail").to_pylist()):
        if reason is None and row_id in dropped:
            reason, detail = dropped.pop(row_id)
        keep.append(reason is None)
        if reason is not None:
            rejects.append(Reject(row_id, reason, detail or ""))
    if dropped:
        raise ContractError(f"{STAGE}: curate_dedup dropped rows this shard does not hold as valid ({', '.join(sorted(dropped)[:3])}"
                            f"{', ...' if len(dropped) > 3 else ''}); its decisions are not of these keys")
    mask = pa.array(keep, type=pa.bool_())
    kept = table.filter(mask).append_column("clip_similarity", keys.column("clip_similarity").filter(mask))
    return ShardResult(kept, rejects)


def run(config, inputs: dict, output_uri: str) -> Manifest | StageOutput:
    settings.check_settings(config)
    images, keys, dedup = inputs["images"], inputs["keys"], inputs["dedup"]
    if not isinstance(dedup, StageOutput) or dedup.summary.get("keys") != keys.uri:
        raise ContractError(f"{STAGE}: the dedup input at {dedup.uri} was not made from the keys at {keys.uri}")
    from components.curate.dedup import dedup_hash

    if dedup.summary.get("config_hash") != dedup_hash(config, keys):
        raise ContractError(f"{STAGE}: the dedup decisions at {dedup.uri} were made with other settings or keys; "
                            "rerun curate_dedup")
    with_decisions = set(dedup.summary.get("decision_shards", []))
    schema = images.arrow_schema().append(pa.field("clip_similarity", pa.float32()))
    plan = shard_plan([images])
    mine = my_part(plan)
    output = ShardedOutput(output_uri, STAGE, settings.config_hash(config), schema, written_shards(mine))
    todo = [p for p in mine if not output.is_done(p[0])]
    progress = bar(STAGE, total=sum(rows for *_, rows in todo))
    progress.set_postfix_str(f"{len(mine) - len(todo)}/{len(mine)} shards already done", refresh=False)
    for name, manifest, in_name, rows in todo:
        table = storage.read_parquet(storage.join(manifest.uri, "data", f"{in_name}.parquet"))
        key_table = storage.read_parquet(storage.join(keys.uri, "data", f"{name}.parquet"),
                                         columns=["id", "clip_similarity", "reason", "detail"])
        decisions = storage.read_parquet(storage.join(dedup.uri, "decisions", f"{name}.parquet"),
                                         columns=["id", "reason", "detail"]) if name in with_decisions else None
        output.commit(name, curate_shard(table, key_table, decisions), rows_in=table.num_rows)
        progress.update(rows)
    progress.close()
    return partial_output(output_uri, plan, mine) or output.finalize(
        [p[0] for p in plan], inputs=[images.uri, keys.uri, dedup.uri])
