"""LAION retrieval: ask the kNN service for neighbours of each seed image embedding and each prompt.

Every returned result is a row in: kept once per URL (first query wins, keeping its provenance), or
rejected as over_num_images (the service sent more than asked), malformed_result (not a row of the
protocol: the detail names the field), missing_url, duplicate_url, below_min_similarity or over_max_urls.
The service is not trusted: a bad row is rejected, never a crash of the stage.

LAION's watermark and unsafe probabilities (`pwatermark`, `punsafe`) are kept where the service returns them
(a clip-retrieval back end returns the metadata columns its `columns_to_return` lists; the request cannot ask
for them), null where it does not; curate filters on them.
"""
from __future__ import annotations

import functools
import math

import pyarrow as pa

from cnpipe import storage
from cnpipe.dataset import Manifest, Reject, ShardedOutput, ShardResult
from cnpipe.ids import stable_id
from cnpipe.progress import bar
from cnpipe.redact import config_without_credentials
from components.laion_retrieval.knn_client import KnnClient, KnnServiceError

STAGE = "laion_retrieval"

RETRIEVED_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("url", pa.string()),
        ("source_caption", pa.string()),
        ("similarity", pa.float32()),
        ("query", pa.string()),
        ("pwatermark", pa.float32()),  # LAION's watermark probability, when the service returns it
        ("punsafe", pa.float32()),  # LAION's NSFW probability, when the service returns it
    ]
)
SCORES = ("pwatermark", "punsafe")
FLOAT32_MAX = 3.4028234663852886e38  # a larger similarity would be stored as inf
_JSON_TYPES = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number",
               float: "a number", type(None): "null"}


def _json_type(value) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:  # a lone surrogate ("\ud800" in the JSON): Parquet cannot hold it
        return False


def malformed(result) -> str:
    """Why `result` is not a row of the protocol ("" when it is): an object whose url is a string (or absent:
    missing_url), caption a string or null, similarity a finite number, pwatermark and punsafe absent, null or
    probabilities."""
    if not isinstance(result, dict):
        return f"result is {_json_type(result)}, not an object"
    url, caption = result.get("url"), result.get("caption")
    if url is not None and not isinstance(url, str):
        return f"url is {_json_type(url)}, not a string"
    if caption is not None and not isinstance(caption, str):
        return f"caption is {_json_type(caption)}, not a string or null"
    for name, text in (("url", url), ("caption", caption)):
        if text is not None and not _utf8(text):
            return f"{name} is not valid text (a lone surrogate)"
    if "similarity" not in result:
        return "similarity is missing"
    similarity = result["similarity"]
    if isinstance(similarity, bool) or not isinstance(similarity, (int, float)):
        return f"similarity is {_json_type(similarity)}, not a number"
    try:
        finite = math.isfinite(similarity) and abs(similarity) <= FLOAT32_MAX
    except OverflowError:  # an integer too large for a float
        finite = False
    if not finite:
        return f"similarity {str(similarity)[:40]} is not a finite float32"
    for name in SCORES:
        problem = _score_problem(name, result.get(name))
        if problem:
            return problem
    return ""


def _score_problem(name: str, value) -> str:
    """A LAION score is absent, null, NaN (LAION's metadata has NaN where a model gave none) or a probability."""
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"{name} is {_json_type(value)}, not a number or null"
    try:
        if math.isnan(value) or 0.0 <= value <= 1.0:
            return ""
    except OverflowError:  # an integer too large for a float
        pass
    return f"{name} {str(value)[:40]} is not a probability between 0 and 1"


def score(value) -> float | None:
    """A checked score as stored: NaN (no score) becomes null."""
    return None if value is None or math.isnan(value) else float(value)


def select(query: str, results: list, seen: set[str], cfg) -> ShardResult:
    """One query's answer: checked row by row, deduped by URL against everything kept so far."""
    rows = {name: [] for name in RETRIEVED_SCHEMA.names}
    rejects: list[Reject] = []
    for position, result in enumerate(results[: cfg.num_images]):
        problem = malformed(result)
        if problem:
            rejects.append(Reject(stable_id("result", query, position), "malformed_result", f"{problem} (result {position} of {query})"))
            continue
        url = (result.get("url") or "").strip()
        row_id = stable_id("url", url)
        similarity = float(result["similarity"])
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
            values = [row_id, url, result.get("caption"), similarity, query, *(score(result.get(n)) for n in SCORES)]
            for name, value in zip(RETRIEVED_SCHEMA.names, values):
                rows[name].append(value)
    extra = len(results) - cfg.num_images
    if extra > 0:  # one shared record: an answer within max_response_bytes may still hold millions of these
        rejects += [Reject(stable_id("over_num_images", query), "over_num_images",
                           f"{query}: {len(results)} results, {cfg.num_images} asked")] * extra
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


def check_settings(config) -> None:
    """Settings that cannot work fail before any task runs, not when retrieval is reached."""
    from pipeline_configs import ConfigError

    cfg = config.retrieval
    problems = [f"retrieval.{name} must be {rule}" for name, ok, rule in [
        ("num_images", cfg.num_images >= 1, "at least 1"),
        ("timeout_s", cfg.timeout_s > 0, "positive"),
        ("query_deadline_s", cfg.query_deadline_s > 0, "positive"),
        ("retries", cfg.retries >= 0, "0 or more"),
        ("max_response_bytes", cfg.max_response_bytes > 0, "positive"),
    ] if not ok]
    if cfg.service_url:  # empty in the embedded preset until its loopback service starts
        try:
            KnnClient(cfg.service_url, cfg)
        except KnnServiceError as err:
            problems.append(str(err))
    if problems:
        raise ConfigError("; ".join(problems))


def run(config, inputs: dict[str, Manifest], output_uri: str) -> Manifest:
    (seeds,) = inputs.values()
    cfg = config.retrieval
    client = KnnClient(cfg.service_url, cfg)
    # hashed and named without credentials: none is written, and a changed password still resumes
    config_hash = config_without_credentials(config)[0].section_hash("retrieval")
    output = ShardedOutput(output_uri, STAGE, config_hash, RETRIEVED_SCHEMA)
    seen: set[str] = set()
    names: list[str] = []
    progress = bar(STAGE, total=None, unit="query")
    for name, load in queries(config, seeds):
        names.append(name)
        if output.is_done(name):  # URLs kept by finished shards still count as seen
            seen.update(storage.read_parquet(storage.join(output_uri, "data", f"{name}.parquet"), columns=["url"])["url"].to_pylist())
            continue
        parts, rows_in = [], 0
        for label, text, embedding in load():
            results = client.query(text=text, embedding=embedding)
            rows_in += len(results)
            parts.append(select(label, results, seen, cfg))  # one answer at a time: only rows and rejects are kept
            progress.update(1)
        table = pa.concat_tables([p.table for p in parts]) if parts else RETRIEVED_SCHEMA.empty_table()
        output.commit(name, ShardResult(table, [r for p in parts for r in p.rejects]), rows_in=rows_in)
    progress.close()
    return output.finalize(names, inputs=[seeds.uri, client.url])
