"""Conditioning: one dataset per control type under <output>/<type>/, each with the image, its caption
and the control image, so that training reads one self-contained dataset.

A row a type cannot condition (no person for pose) is rejected from that type's dataset with its
reason and stays in the others. Images are decoded once per row for all types; rows spread over a
pool of worker processes, each holding its own conditioners (MediaPipe graphs are not shareable).
"""
from __future__ import annotations

import dataclasses
import multiprocessing
import os
import sys
from collections import Counter

import numpy as np
import pyarrow as pa

from cnpipe import images, storage
from cnpipe.dataset import Manifest, Reject, ShardedOutput, ShardResult, StageOutput
from cnpipe.progress import bar
from cnpipe.stage import my_part, partial_output, shard_plan
from components.conditioning.contract import NoControl
from components.registry import CONDITIONERS, conditioner_class, conditioning_groups

STAGE = "conditioning"
_worker_conditioners: dict = {}
_conditioner_libraries: set[str] = set()  # top-level packages that building the conditioners imported


def _init_worker(config) -> None:
    _worker_conditioners.clear()
    for name in config.types:
        _worker_conditioners[name] = conditioner_class(name)(config)


def _worker_pool(cfg, workers: int, preload: list[str]):
    """Workers forked from a server process that imported the conditioners' libraries once (forkserver with
    those modules preloaded), instead of spawned workers that each import them again: MediaPipe's import alone
    is ~2 s of CPU per process. Still fresh processes: no threads or MediaPipe graphs inherited from this one."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(preload)
    return context.Pool(workers, _init_worker, (cfg,))


def control_images(blob: bytes | None) -> tuple[tuple[str, str] | None, dict]:
    """For one encoded image: (decode rejection or None, {type: PNG bytes or (reason, detail)})."""
    try:
        rgb = np.asarray(images.decode_rgb(blob))
    except images.ImageRejected as err:
        return (err.reason, err.detail), {}
    made = {}
    for name, conditioner in _worker_conditioners.items():
        try:
            made[name] = images.encode_array(conditioner(rgb), "png")
        except NoControl as err:
            made[name] = (err.reason, err.detail)
    return None, made


def chosen_caption(source: str | None, blip: str | None, preference: str) -> str:
    if preference == "blip":
        return blip or ""
    if preference == "source":
        return source or ""
    return source if source and source.strip() else (blip or "")


def condition_shard(table: pa.Table, results: list, types: list[str], preference: str) -> dict[str, ShardResult]:
    ids = table.column("id").to_pylist()
    per_type = {name: (([], []), [], Counter()) for name in types}  # (kept rows, controls), rejects, notes
    for row, (row_id, (decode_error, made)) in enumerate(zip(ids, results)):
        for name in types:
            (kept, controls), rejects, _ = per_type[name]
            outcome = decode_error or made[name]
            if isinstance(outcome, tuple):
                rejects.append(Reject(row_id, outcome[0], outcome[1]))
            else:
                kept.append(row)
                controls.append(outcome)
    captions = [
        chosen_caption(s, b, preference)
        for s, b in zip(table.column("source_caption").to_pylist(), table.column("blip_caption").to_pylist())
    ]
    out = {}
    for name in types:
        (kept, controls), rejects, notes = per_type[name]
        subset = table.take(pa.array(kept, type=pa.int64()))
        subset = subset.append_column("caption", pa.array([captions[i] for i in kept], type=pa.string()))
        subset = subset.append_column("control", pa.array(controls, type=pa.binary()))
        notes["empty_caption"] = sum(1 for i in kept if not captions[i].strip())
        out[name] = ShardResult(subset, rejects, +notes)
    return out


def run(config, inputs: dict[str, Manifest], output_uri: str):
    cfg = config.conditioning
    if not cfg.types:
        raise ValueError("conditioning.types is empty: name at least one of the registered types")
    if cfg.caption_source not in ("prefer_source", "blip", "source"):
        raise ValueError(f"conditioning.caption_source must be prefer_source, blip or source, got {cfg.caption_source!r}")
    (source,) = inputs.values()
    all_types = list(cfg.types)
    family = os.environ.get("CNPIPE_FAMILY", "")
    cfg = dataclasses.replace(cfg, types=conditioning_groups(all_types).get(family, []) if family else all_types)
    if not cfg.types:
        raise ValueError(f"none of conditioning.types {all_types} is made in the {family!r} family")
    # Build the conditioners here first: an unknown type or unusable settings (a pose model the wheel does not
    # ship) fail before any work. Raised in a Pool initializer, the same error would respawn workers forever.
    imported = set(sys.modules)
    _init_worker(cfg)
    _conditioner_libraries.update(name.split(".")[0] for name in set(sys.modules) - imported)
    preload = [__name__, *(CONDITIONERS[name][0].partition(":")[0] for name in cfg.types), *sorted(_conditioner_libraries)]
    schema = source.arrow_schema().append(pa.field("caption", pa.string())).append(pa.field("control", pa.binary()))
    config_hash = config.section_hash("conditioning")
    outputs = {name: ShardedOutput(storage.join(output_uri, name), f"{STAGE}/{name}", config_hash, schema) for name in cfg.types}
    plan = shard_plan([source])
    mine = my_part(plan)
    todo = [p for p in mine if not all(out.is_done(p[0]) for out in outputs.values())]
    workers = cfg.workers or os.cpu_count() or 1
    progress = bar(STAGE, total=sum(rows for *_, rows in todo))
    progress.set_postfix_str(f"{len(plan) - len(todo)}/{len(plan)} shards already done", refresh=False)
    pool = _worker_pool(cfg, workers, preload) if workers > 1 and todo else None
    try:
        for shard, manifest, in_name, rows in todo:
            table = storage.read_parquet(storage.join(manifest.uri, "data", f"{in_name}.parquet"))
            blobs = table.column("image").to_pylist()
            results = pool.map(control_images, blobs, chunksize=max(1, len(blobs) // (4 * workers))) if pool else list(map(control_images, blobs))
            for name, result in condition_shard(table, results, cfg.types, cfg.caption_source).items():
                if not outputs[name].is_done(shard):
                    outputs[name].commit(shard, result, rows_in=table.num_rows)
            progress.update(rows)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    progress.close()
    partial = partial_output(output_uri, plan, mine)
    if partial is not None:
        return partial
    manifests = {name: out.finalize([p[0] for p in plan], inputs=[source.uri]) for name, out in outputs.items()}
    types = {
        name: {"uri": m.uri, "rows_in": m.rows_in, "rows_out": m.rows_out, "rows_rejected": m.rows_rejected, "rejections": m.rejections}
        for name, m in manifests.items()
    }
    storage.write_json_atomic(storage.join(output_uri, "groups", f"{family or 'all'}.json"), {"family": family, "types": types})
    summary = {"uri": output_uri, "types": types}
    if cfg.types != all_types:  # other families make the other types; conditioning_merge writes summary.json
        return StageOutput(output_uri, summary)
    storage.write_json_atomic(storage.join(output_uri, "summary.json"), summary)
    return summary
