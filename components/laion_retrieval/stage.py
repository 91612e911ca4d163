"""LAION retrieval: ask the kNN service for neighbours of each seed image embedding and each prompt.

Every returned result is a row in: kept once per URL (first query wins, keeping its provenance),
or rejected as duplicate_url, below_min_similarity, missing_url or over_max_urls.
"""
from __future__ import annotations

import functools

import pyarrow as pa

from cnpipe import storage
from cnpipe.dataset import Manifest, Reject, ShardedOutput, ShardResult
from cnpipe.ids import stable_id
from cnpipe.progress import bar
from components.laion_retrieval.knn_client import KnnClient

STAGE = "laion_retrieval"

RETRIEVED_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("url", pa.string()),
        ("source_caption", pa.string()),
        ("similarity", pa.float32()),
        ("query", pa.string()),
    ]
)


def select(results: list[tuple[str, dict]], seen: set[str], cfg) -> ShardResult:
    """Dedupe (query, result) pairs by URL against everything kept so far."""
    rows = {name: [] for name in RETRIEVED_SCHEMA.names}
    rejects: list[Reject] = []
    for query, result in results:
        url = (result.get("url") or "").strip()
        row_id = stable_id("url", url)
        similarity = float(result.get("similarity", 0.0))
        if not url:
            rejects.append(Reject(stable_id("result", query, result.get("id")), "missing_url", query))
        elif url in seen:
            rejects.append(Reject(row_id, "duplicate_url", f"{url} from {query}"))
        elif similarity < cfg.min_similarity:
            rejects.append(Reject(row_id, "below_min_similarity", f"{similarity:.3f} {url}"))
        elif cfg.max_urls and len(seen) >= cfg.max_urls:
            rejects.append(Reject(row_id, "over_max_urls", url))
        else:
            seen.add(url)
            for name, value in zip(RETRIEVED_SCHEMA.names, [row_id, url, result.get("caption"), similarity, query]):
                rows[name].append(value)
    return ShardResult(pa.table(rows, schema=RETRIEVED_SCHEMA), rejects)


def _seed_queries(url: str, limit: int) -> list[tuple[str, None, list]]:
    table = storage.read_parquet(url, columns=["id", "clip_embedding"])
    pairs = zip(table["id"].to_pylist(), table["clip_embedding"].to_pylist())
    return [(f"seed:{i}", None, e) for i, e in pairs if e][:limit]


def queries(config, seeds: Manifest):
    """(shard name, loader of [(query label, text or None, embedding or None)]) in a fixed order."""
    cfg = config.retrieval
    if cfg.prompts:
        yield "prompts", lambda: [(f"prompt:{p}", p, None) for p in cfg.prompts]
    if not cfg.use_image_seeds:
        return
    remaining = cfg.max_seed_images or sum(s["rows"] for s in seeds.shards)
    for (name, url), shard in zip(seeds.shard_urls(), seeds.shards):
        if remaining <= 0:
            return
        take = min(shard["rows"], remaining)
        remaining -= take
        yield f"seeds-{name}", functools.partial(_seed_queries, url, take)


def run(config, inputs: dict[str, Manifest], output_uri: str) -> Manifest:
    (seeds,) = inputs.values()
    client = KnnClient(config.retrieval.service_url, config.retrieval)
    output = ShardedOutput(output_uri, STAGE, config.section_hash("retrieval"), RETRIEVED_SCHEMA)
    seen: set[str] = set()
    names: list[str] = []
    progress = bar(STAGE, total=None, unit="query")
    for name, load in queries(config, seeds):
        names.append(name)
        if output.is_done(name):  # URLs kept by finished shards still count as seen
            seen.update(storage.read_parquet(storage.join(output_uri, "data", f"{name}.parquet"), columns=["url"])["url"].to_pylist())
            continue
        results = []
        for label, text, embedding in load():
            results += [(label, r) for r in client.query(text=text, embedding=embedding)]
            progress.update(1)
        output.commit(name, select(results, seen, config.retrieval), rows_in=len(results))
    progress.close()
    return output.finalize(names, inputs=[seeds.uri, config.retrieval.service_url])
