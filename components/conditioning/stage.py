"""Conditioning: one dataset per control type under <output>/<type>/, each with the image, its caption
and the control image, so that training reads one self-contained dataset.

A row a type cannot condition (no person for pose) is rejected from that type's dataset with its
reason and stays in the others. Images are decoded once per row for all types. Rows spread over a
pool of threads, each row lent one of `workers` sets of conditioners (MediaPipe graphs are not
shareable): OpenCV, MediaPipe and torch release the GIL while they compute, so threads use every
core without a process pool's start-up (MediaPipe's import is ~2 s per process) or pickling every
image to a worker. The next shard is read and queued while the last one's rows are committed.
"""
from __future__ import annotations

import dataclasses
import os
import queue
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np
import pyarrow as pa

from cnpipe import images, storage
from cnpipe.dataset import Manifest, Reject, ShardedOutput, ShardResult, StageOutput
from cnpipe.progress import bar
from cnpipe.stage import my_part, partial_output, shard_plan, written_shards
from components.conditioning.contract import NoControl
from components.registry import conditioner_class, conditioning_groups

STAGE = "conditioning"


class ConditionerSets:
    """`count` independent sets of the configured conditioners, each lent to one row at a time. All are built
    here, before any work: an unknown type or unusable settings (a pose model the wheel does not ship) fail
    at once, with the error from the conditioner."""

    def __init__(self, cfg, count: int) -> None:
        self._free: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(count):
            self._free.put({name: conditioner_class(name)(cfg) for name in cfg.types})

    @contextmanager
    def lend(self):
        conditioners = self._free.get()
        try:
            yield conditioners
        finally:
            self._free.put(conditioners)


def worker_count(cfg) -> int:
    """conditioning.workers (0: one per core), capped by any type whose library already uses every core per call."""
    wanted = cfg.workers or os.cpu_count() or 1
    caps = [getattr(conditioner_class(name), "max_parallel", None) for name in cfg.types]
    return max(1, min([wanted, *(cap for cap in caps if cap)]))


def control_images(blob: bytes | None, conditioners: dict) -> tuple[tuple[str, str] | None, dict]:
    """For one encoded image: (decode rejection or None, {type: PNG bytes or (reason, detail)})."""
    try:
        rgb = np.asarray(images.decode_rgb(blob))
    except images.ImageRejected as err:
        return (err.reason, err.detail), {}
    made = {}
    for name, conditioner in conditioners.items():
        try:
            made[name] = images.encode_control(conditioner(rgb))
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


def check_settings(config) -> None:
    """The conditioning settings alone, checked before any image is read (and by the driver before any stage)."""
    from pipeline_configs import CAPTION_SOURCES, ConfigError

    cfg = config.conditioning
    if not cfg.types:
        raise ConfigError("conditioning.types is empty: name at least one of the registered types")
    try:
        conditioning_groups(list(cfg.types))  # every type registered
    except ValueError as err:
        raise ConfigError(f"conditioning.types: {err}") from None
    if cfg.caption_source not in CAPTION_SOURCES:
        raise ConfigError(f"conditioning.caption_source must be one of {', '.join(CAPTION_SOURCES)}, got {cfg.caption_source!r}")
    if cfg.workers < 0:
        raise ConfigError(f"conditioning.workers must be 0 (one per core) or more, got {cfg.workers}")
    if cfg.detect_resolution != 0 and cfg.detect_resolution < 64:
        raise ConfigError(f"conditioning.detect_resolution must be 0 (the image's own size) or at least 64 "
                          f"(sides are rounded to multiples of 64), got {cfg.detect_resolution}")
    for name in ("pose_min_spread", "pose_min_area", "pose_max_limb_ratio", "pose_min_head_ratio"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"conditioning.{name} must be 0 (no check) or more, got {getattr(cfg, name)}")


def run(config, inputs: dict[str, Manifest], output_uri: str):
    check_settings(config)
    cfg = config.conditioning
    (source,) = inputs.values()
    all_types = list(cfg.types)
    family = os.environ.get("CNPIPE_FAMILY", "")
    cfg = dataclasses.replace(cfg, types=conditioning_groups(all_types).get(family, []) if family else all_types)
    if not cfg.types:
        raise ValueError(f"none of conditioning.types {all_types} is made in the {family!r} family")
    schema = source.arrow_schema().append(pa.field("caption", pa.string())).append(pa.field("control", pa.binary()))
    config_hash = config.section_hash("conditioning")
    plan = shard_plan([source])
    mine = my_part(plan)
    outputs = {name: ShardedOutput(storage.join(output_uri, name), f"{STAGE}/{name}", config_hash, schema,
                                   written_shards(mine)) for name in cfg.types}
    todo = [p for p in mine if not all(out.is_done(p[0]) for out in outputs.values())]
    workers = worker_count(cfg)
    conditioner_sets = ConditionerSets(cfg, workers)
    progress = bar(STAGE, total=sum(rows for *_, rows in todo))
    progress.set_postfix_str(f"{len(plan) - len(todo)}/{len(plan)} shards already done", refresh=False)

    def make(blob):
        with conditioner_sets.lend() as conditioners:
            return control_images(blob, conditioners)

    def commit(shard: str, table: pa.Table, results) -> None:
        for name, result in condition_shard(table, list(results), cfg.types, cfg.caption_source).items():
            if not outputs[name].is_done(shard):
                outputs[name].commit(shard, result, rows_in=table.num_rows)
        progress.update(table.num_rows)

    with ThreadPoolExecutor(workers, thread_name_prefix=STAGE) as executor:
        queued = None  # one shard ahead: its rows compute while the shard before it is committed
        for shard, manifest, in_name, _ in todo:
            table = storage.read_parquet(storage.join(manifest.uri, "data", f"{in_name}.parquet"))
            current = (shard, table, executor.map(make, table.column("image").to_pylist()))
            if queued is not None:
                commit(*queued)
            queued = current
        if queued is not None:
            commit(*queued)
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
