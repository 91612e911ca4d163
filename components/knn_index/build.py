"""Build a kNN index with autofaiss, in the folder layout `clip-retrieval back` serves, from clip-retrieval's
embedding layout (`layout.py`) or from a clip_embed output (`from_clip_embed.py`). Runs in the index family's
environment (autofaiss pins numpy<2: envs/index.in).

    <output>/image.index              faiss index chosen and tuned by autofaiss under the memory budget (inner
                                      product on L2-normalised vectors; memory-mappable: IVF, not HNSW), nprobe
                                      stored in the file
    <output>/metadata/metadata_<k>.arrow
                                      Arrow IPC files, uncompressed, in the vectors' order: row i of their
                                      concatenation describes vector i. Read memory-mapped by row id
    <output>/infos.json               autofaiss's report: index key, search parameters, size, speed
    <output>/index.json               written last (the index exists once it does): count, dim, sources and their
                                      row ranges, the budget, the memory plan (budget.py) and what the build
                                      measured (time, peak memory, and per autofaiss phase)

The budget (index.current_memory_available) is planned before any work (budget.py: the index type, training sample
and add batch that fit, or a refusal naming each phase that does not) and checked after: a measured peak over it
is a loud warning in the log and index.json (within_budget false), not a failure.

    python -m components.knn_index.build --config-json "$(cat config.json)"     # index.source -> index.output
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import pathlib
import shutil
import sys
import tempfile
import time

import pyarrow as pa
import pyarrow.parquet as pq

from cnpipe import storage
from components.knn_index import budget as budget_mod
from components.knn_index import layout as layout_mod
from components.knn_index.memory import PeakMemory, PhaseLog, human, parse_size

FORMAT = "cnpipe.knn_index/1"
INDEX_FILE = "image.index"
MARKER = "index.json"
SOURCE_KINDS = ("auto", "clip_retrieval", "clip_embed")


def log(message: str) -> None:
    print(f"knn_index: {message}", file=sys.stderr, flush=True)


def settings_key(cfg, source: str) -> str:
    """What makes one index differ from another: the same key finds a finished index and skips the build."""
    chosen = {k: getattr(cfg, k) for k in ("source_kind", "image_url_prefix", "metadata_columns", "dim",
                                           "max_index_memory_usage", "index_key")}
    return hashlib.sha256(json.dumps({"source": source, **chosen}, sort_keys=True).encode()).hexdigest()[:16]


def search_settings(cfg) -> dict:
    """What autofaiss tunes the search parameters (nprobe) for: changing only these re-tunes the built index."""
    return {"max_index_query_time_ms": cfg.max_index_query_time_ms,
            "min_nearest_neighbors_to_retrieve": cfg.min_nearest_neighbors_to_retrieve}


def retune(cfg, output: str, summary: dict) -> dict:
    """autofaiss's tune_index on the built index: nprobe for new search settings, without training again."""
    from autofaiss import tune_index

    started = time.time()
    with tempfile.TemporaryDirectory(prefix="knn-index-") as tmp:
        local, tuned = pathlib.Path(tmp) / INDEX_FILE, pathlib.Path(tmp) / "tuned.index"
        fs, path = storage.filesystem(storage.join(output, INDEX_FILE))
        fs.get_file(path, str(local))
        index = tune_index(str(local), summary["index_key"], output_index_path=str(tuned), save_on_disk=True,
                           max_index_query_time_ms=cfg.max_index_query_time_ms,
                           min_nearest_neighbors_to_retrieve=cfg.min_nearest_neighbors_to_retrieve)
        param = search_param(index)
        del index
        _put(tuned, storage.join(output, INDEX_FILE))
    infos_url = storage.join(output, "infos.json")
    infos = storage.read_json(infos_url) if storage.exists(infos_url) else {}
    summary.update({"index_param": param, "search_settings": search_settings(cfg),
                    "retune_seconds": round(time.time() - started, 1)})
    storage.write_json_atomic(infos_url, {**infos, "index_param": param})
    storage.write_json_atomic(storage.join(output, MARKER), summary)
    log(f"re-tuned {output} for {cfg.max_index_query_time_ms} ms per query: {param} ({summary['retune_seconds']} s)")
    return summary


def search_param(index) -> str:
    """The search parameters an IVF index holds: nprobe, and efSearch of an HNSW coarse quantizer."""
    import faiss

    ivf = faiss.extract_index_ivf(index)
    parts = [f"nprobe={ivf.nprobe}"]
    hnsw = getattr(faiss.downcast_index(ivf.quantizer), "hnsw", None)
    if hnsw is not None:
        parts.append(f"efSearch={hnsw.efSearch}")
    return ",".join(parts)


def resolve_kind(source: str, kind: str) -> str:
    if kind not in SOURCE_KINDS:
        raise layout_mod.LayoutError(f"index.source_kind must be one of {', '.join(SOURCE_KINDS)}, not {kind!r}")
    if kind != "auto":
        return kind
    if storage.exists(storage.join(source, "manifest.json")):
        return "clip_embed"
    return "clip_retrieval"


def check_budget(cfg) -> tuple[int, int]:
    try:
        return parse_size(cfg.max_index_memory_usage), parse_size(cfg.current_memory_available)
    except ValueError as err:
        raise layout_mod.LayoutError(f"index.max_index_memory_usage / current_memory_available: {err}") from None


def write_metadata(files: list[layout_mod.EmbeddingFile], columns: list[str], output: str) -> list[str]:
    """Each metadata Parquet file as one uncompressed Arrow IPC file (memory-mappable), in the vectors' order; only
    `columns` (those present), strings as large_string-free plain strings. Streams one file at a time."""
    names = []
    for number, file in enumerate(files):
        fs, path = storage.filesystem(file.metadata)
        with fs.open(path, "rb") as f:
            parquet = pq.ParquetFile(f)
            keep = [c for c in columns if c in parquet.schema_arrow.names]
            table = parquet.read(columns=keep)
        if table.num_rows != file.rows:
            raise layout_mod.LayoutError(f"{file.metadata}: {table.num_rows} rows for {file.rows} vectors")
        for name in columns:  # a column the set lacks is null, so that every file has one schema
            if name not in keep:
                table = table.append_column(name, pa.nulls(table.num_rows, pa.string()))
        table = table.select(columns)
        sink = pa.BufferOutputStream()
        with pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table, max_chunksize=65536)
        name = f"metadata_{number:05d}.arrow"  # zero-padded: clip-retrieval back and we read them in sorted order
        storage.write_bytes_atomic(storage.join(output, "metadata", name), sink.getvalue().to_pybytes())
        names.append(name)
    return names


def memory_plan(cfg, found, budget: int) -> budget_mod.Plan:
    """The index type (cfg.index_key, or the first of autofaiss's candidates that fits), training sample and add
    batch that keep the build within `budget`, counting this process as it is now; BudgetError if none fits."""
    import autofaiss  # noqa: F401 - loaded before measuring the process: the build holds it too

    return budget_mod.plan(found.count, found.dim, budget, budget_mod.process_rss(), cfg.max_index_memory_usage,
                           cfg.index_key)


def run_autofaiss(cfg, embeddings_folder: str, work: pathlib.Path, plan: budget_mod.Plan,
                  peak: PeakMemory) -> tuple[dict, int]:
    """(autofaiss's infos, vectors in the index) for the index it builds at work/image.index, within the plan's
    training sample, add batch and read-ahead; `peak` follows its phases."""
    from autofaiss import build_index

    logger = logging.getLogger("autofaiss")
    logger.setLevel(logging.INFO)
    peak.enter("autofaiss, between its phases")
    phases = PhaseLog(peak)
    logger.addHandler(phases.handler)
    try:
        with budget_mod.autofaiss_within(plan):
            index, infos = _build_index(build_index, cfg, embeddings_folder, work, plan.index_key)
    finally:
        logger.removeHandler(phases.handler)
        peak.enter("after autofaiss")
    if index is None:
        raise RuntimeError("autofaiss built no index (see its log above)")
    return infos or {}, int(index.ntotal)


def _build_index(build_index, cfg, embeddings_folder: str, work: pathlib.Path, index_key: str):
    return build_index(
        embeddings=embeddings_folder,
        index_path=str(work / INDEX_FILE),
        index_infos_path=str(work / "infos.json"),
        file_format="npy",
        max_index_memory_usage=cfg.max_index_memory_usage,
        current_memory_available=cfg.current_memory_available,
        max_index_query_time_ms=cfg.max_index_query_time_ms,
        min_nearest_neighbors_to_retrieve=cfg.min_nearest_neighbors_to_retrieve,
        index_key=index_key,
        metric_type="ip",
        should_be_memory_mappable=True,  # IVF (inverted lists read from the mapped file), never HNSW
        nb_cores=cfg.nb_cores or None,
        save_on_disk=True,
        verbose=logging.INFO,
    )


def build(cfg, source: str, output: str, force: bool = False) -> dict:
    """Build the index of `source` into `output`; returns what index.json says. A finished index with the same
    source and settings is kept (`force` rebuilds)."""
    if not source or not output:
        raise layout_mod.LayoutError("set index.source (the embeddings) and index.output (where the index goes)")
    max_index, budget = check_budget(cfg)
    key = settings_key(cfg, source)
    marker = storage.join(output, MARKER)
    if not force and storage.exists(marker) and storage.read_json(marker).get("settings_key") == key:
        summary = storage.read_json(marker)
        if summary.get("search_settings", search_settings(cfg)) != search_settings(cfg):
            return retune(cfg, output, summary)
        log(f"{output} already holds this index (index.json; rebuild with --force)")
        return summary
    kind = resolve_kind(source, cfg.source_kind)
    started, cpu_started = time.time(), _cpu_seconds()
    with PeakMemory() as peak:
        columns = list(dict.fromkeys(["url", *cfg.metadata_columns]))
        if kind == "clip_embed":
            from components.knn_index import from_clip_embed

            staged = storage.join(output, "_embeddings")
            from_clip_embed.check(source, cfg)  # every problem before anything is written
            log(f"writing the clip_embed output {source} in clip-retrieval's layout under {staged}")
            from_clip_embed.write_layout(source, staged, cfg)
            embeddings_source = staged
        else:
            embeddings_source = source
        found = layout_mod.check(embeddings_source, expect_dim=cfg.dim, check_rows=cfg.check_rows,
                                 norm_tolerance=cfg.norm_tolerance)
        log(f"{found.count} vectors of dimension {found.dim} ({found.files[0].dtype}) in {len(found.files)} files; "
            f"index of at most {human(max_index)}, built within {human(budget)}")
        plan = memory_plan(cfg, found, budget)  # refused here, before any index work, if it cannot fit
        if storage.exists(marker):  # a rebuild: the old index stops being one before its files change
            storage.filesystem(marker)[0].rm(storage.filesystem(marker)[1])
        peak.enter("writing metadata")
        metadata_files = write_metadata(found.files, columns, output)
        plan = memory_plan(cfg, found, budget)  # again, with what writing the metadata left in this process
        log(f"memory plan: {plan.index_key}, training on {plan.train_size} vectors (planned peak "
            f"{human(plan.training_peak)}), adding {plan.batch_size} at a time ({human(plan.adding_peak)}), this "
            f"process {human(plan.baseline)}" + "".join(f"; not {s}" for s in plan.skipped))
        with tempfile.TemporaryDirectory(prefix="knn-index-") as tmp:
            work = pathlib.Path(tmp)
            infos, total = run_autofaiss(cfg, found.embeddings_folder, work, plan, peak)
            if total != found.count:
                raise RuntimeError(f"autofaiss indexed {total} vectors of {found.count}: the metadata would not align")
            index_bytes = (work / INDEX_FILE).stat().st_size
            _put(work / INDEX_FILE, storage.join(output, INDEX_FILE))
            storage.write_json_atomic(storage.join(output, "infos.json"), infos)
    first = 0
    sources = []
    for file in found.files:
        sources.append({"embeddings": file.embeddings, "metadata": file.metadata, "rows": file.rows, "first_id": first})
        first += file.rows
    summary = {
        "format": FORMAT, "settings_key": key, "source": source, "source_kind": kind, "count": found.count,
        "dim": found.dim, "metric": "inner_product", "index_key": infos.get("index_key", ""),
        "index_param": infos.get("index_param", ""), "search_settings": search_settings(cfg), "index_bytes": index_bytes,
        "bytes_per_vector": round(index_bytes / found.count, 2), "metadata_columns": columns,
        "metadata_files": metadata_files, "sources": sources, "max_index_memory_usage": cfg.max_index_memory_usage,
        "current_memory_available": cfg.current_memory_available, "build_seconds": round(time.time() - started, 1),
        "build_cpu_seconds": round(_cpu_seconds() - cpu_started, 1),
        "peak_rss_bytes": peak.bytes, "peak_anon_bytes": peak.anon_bytes, "budget_bytes": budget,
        "within_budget": peak.bytes <= budget, "over_budget_bytes": max(0, peak.bytes - budget),
        "memory_plan": plan.as_dict(), "phases_memory": peak.phases,
    }
    storage.write_json_atomic(marker, summary)
    note = ""
    if not summary["within_budget"]:
        # warned, not failed: the index is whole and usable (a process over its pod's limit is killed before this);
        # autofaiss itself treats current_memory_available as a planning figure ("more might be used")
        note = f" (over the budget of {human(budget)})"
        phase = max(peak.phases, key=lambda p: peak.phases[p]["peak_rss_bytes"])
        warning = (f"WARNING: the build's peak memory {human(peak.bytes)} went over index.current_memory_available "
                   f"{human(budget)} by {human(peak.bytes - budget)}, in {phase!r}; the plan expected "
                   f"{human(plan.peak)}. A pod with a limit of {human(budget)} would have been killed: raise the "
                   f"budget, and report the phase (components/knn_index/budget.py plans it)")
        log("!" * 20 + " " + warning)
    log(f"built {output}: {summary['index_key']} ({summary['index_param'] or 'no search parameters'}), "
        f"{human(index_bytes)} ({summary['bytes_per_vector']} bytes/vector), {summary['build_seconds']} s, "
        f"peak memory {human(peak.bytes)} ({human(peak.anon_bytes)} anonymous){note}")
    return summary


def _cpu_seconds() -> float:
    """User + system CPU time of this process (autofaiss and faiss run in it) and of children it waited for."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _put(local: pathlib.Path, url: str) -> None:
    """Move a local file to `url` (a local path: renamed within its file system when it can be; else uploaded)."""
    fs, path = storage.filesystem(url)
    if storage._is_local(fs):  # noqa: SLF001 - the same test the storage layer uses
        target = pathlib.Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".tmp-{os.getpid()}-{target.name}")
        shutil.move(str(local), tmp)
        os.replace(tmp, target)
    else:
        fs.put_file(str(local), path)


def main(argv: list[str] | None = None) -> int:
    import pipeline_configs

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-json", required=True, help="a whole PipelineConfig as JSON (its index section is used)")
    parser.add_argument("--force", action="store_true", help="rebuild even if the output holds this index")
    args = parser.parse_args(argv)
    config = pipeline_configs.from_json(args.config_json)
    cfg = config.index
    try:
        build(cfg, cfg.source, cfg.output, force=args.force)
    except (layout_mod.LayoutError, budget_mod.BudgetError) as err:
        print(f"index: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
