"""Download: every URL row becomes an image (via img2dataset) or a rejection with its reason.

Rows that already carry an image (the seeds) pass through, so this stage's output is the whole
image set that captioning and conditioning work on. Consecutive input shards share one
batch (up to download.batch_rows rows) and each is then committed on its own, so a rerun skips them. A
batch's URLs are split evenly over img2dataset's worker processes (img2dataset_pool), which start with the
stage and download the next batch while the last one is committed.

Images are what cnpipe.images decodes (faithful.py: EXIF orientation, 16-bit, CMYK, palette, alpha; conversions
counted in notes) and a defect has hub_load's name for it. A failure that a later try may not have (connection
error, timeout, DNS, 5xx) is final only in a shard where such failures are few: a shard with more than
download.max_transient_fraction of them is left uncommitted, and the stage fails after committing the rest, so
that a rerun fetches it again instead of losing its rows to a brief outage.
"""
from __future__ import annotations

import contextlib
import functools
import ipaddress
import math
import os
import re
import signal
import sys
import tempfile
import urllib.parse
from collections import Counter
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cnpipe.dataset import Manifest, Reject, ShardResult
from cnpipe.stage import ShardNotFinal, run_pipelined
from components.download import url_guard
from components.download.img2dataset_pool import Fetched, Img2datasetPool
from components.download.url_guard import ENV_VAR, UnsafeUrl, UrlPolicy

STAGE = "download"

IMAGE_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("image", pa.binary()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("url", pa.string()),
        ("source_caption", pa.string()),
        ("origin", pa.string()),
        ("similarity", pa.float32()),
        ("query", pa.string()),
        ("pwatermark", pa.float32()),  # LAION's scores, carried from retrieval (null where it returned none, seeds)
        ("punsafe", pa.float32()),
    ]
)


# img2dataset's own failure messages: fixed texts (its resizer never sees the URL), named as hub_load names the same
# defect (an area over the cap is a decompression_bomb there; the guard's header check finds those first anyway)
IMG2DATASET_REASONS = {
    "image too small": "too_small", "image area too large": "decompression_bomb", "aspect ratio too large": "bad_aspect_ratio",
    "Image decoding error": "not_an_image", "Use of image disallowed by X-Robots-Tag directive": "opted_out",
}

# Reasons a later try may not have: the network, the site or our own process (a killed embedded web, a pod's
# network) was briefly down. Everything else (404, not an image, too small, refused address) is final.
TRANSIENT_REASONS = {"connection_error", "timeout", "dns_failure", "http_408", "http_429", "download_missing"}
# A shard with more of its URLs failed transiently than download.max_transient_fraction is not committed
# (cnpipe.stage.ShardNotFinal): the stage fails once the other shards are committed, and a rerun (or the task's
# retry) fetches it again. Below it the shard is committed, its transient failures rejected as final.


def is_transient(reason: str) -> bool:
    return reason in TRANSIENT_REASONS or re.fullmatch(r"http_5\d\d", reason) is not None


def failure_reason(message: str | None) -> str:
    """A failed row's reason from img2dataset's error_message, never by searching its free text (which holds the
    URL, so a URL could pick its own reason): the guard's reason token that the message starts with, one of
    img2dataset's fixed messages, or the 'HTTP Error NNN: ' that urllib's error starts with on executors without
    the guard (pyspark, ray). Anything else is download_error (the text stays in `detail`)."""
    reason = url_guard.reason_in(message) or IMG2DATASET_REASONS.get(message or "")
    if reason:
        return reason
    code = re.match(r"HTTP Error (\d{3}): ", message or "")
    return f"http_{code.group(1)}" if code else "download_error"


@contextlib.contextmanager
def quiet_file_descriptors(log_path: str):
    """img2dataset's worker processes print per-shard stats and bars to fds 1 and 2; keep them in a log
    (shown when the call fails) so that our one progress bar stays readable."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log_path, "wb") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    try:
        yield
    except BaseException:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        with open(log_path, "rb") as log:
            sys.stderr.write(log.read()[-4000:].decode(errors="replace"))
        raise
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])


@contextlib.contextmanager
def own_sigint_handler():
    """img2dataset.download installs a SIGINT handler that exits with status 0; put ours back after the call, so
    that an interrupted stage fails instead of passing for a finished one."""
    saved = signal.getsignal(signal.SIGINT)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, saved)


class Img2datasetCalls:
    """One img2dataset.download() per batch, for the pyspark and ray distributors: it ships the Downloader to
    your cluster's executors (the multiprocessing one is Img2datasetPool, without a call's start-up)."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.processes = max(1, cfg.processes_count)

    def __enter__(self) -> "Img2datasetCalls":
        return self

    def __exit__(self, *exc) -> None:
        pass

    def submit(self, groups: list[list[tuple[str, str]]], share_rows: int) -> list[Callable[[], Fetched]]:
        """One call for every group (their keys are distinct), done before this returns."""
        fetched = fetch([pair for urls in groups for pair in urls], share_rows, self.cfg)
        return [lambda: fetched] * len(groups)


def fetch(urls: list[tuple[str, str]], share_rows: int, cfg) -> Fetched:
    """Run img2dataset.download on (key, url) pairs; return its output rows (status, error_message, image, size) by key."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # else its import phones home
    import img2dataset

    with tempfile.TemporaryDirectory(prefix="cnpipe-dl-") as tmp:
        pq.write_table(pa.table({"url": [u for _, u in urls], "row_key": [k for k, _ in urls]}), f"{tmp}/urls.parquet")
        with quiet_file_descriptors(f"{tmp}/img2dataset.log"), own_sigint_handler():
            img2dataset.download(
                url_list=f"{tmp}/urls.parquet", input_format="parquet", url_col="url", save_additional_columns=["row_key"],
                output_format="parquet", output_folder=f"{tmp}/out",
                number_sample_per_shard=share_rows,
                image_size=cfg.image_size, resize_mode=cfg.resize_mode, resize_only_if_bigger=True,
                min_image_size=cfg.min_image_size, max_aspect_ratio=cfg.max_aspect_ratio, max_image_area=cfg.max_image_area,
                timeout=cfg.timeout_s, retries=cfg.retries, thread_count=cfg.thread_count,
                processes_count=cfg.processes_count, encode_format=cfg.encode_format, encode_quality=cfg.encode_quality,
                user_agent_token=cfg.user_agent_token, disallowed_header_directives=cfg.disallowed_header_directives,
                incremental_mode="incremental", enable_wandb=False, compute_hash=None, extract_exif=False,
                distributor=cfg.distributor,
            )
        return Fetched.read(f"{tmp}/out", cfg.encode_format)


def urls_to_fetch(table: pa.Table, policy: UrlPolicy, prefix: str) -> tuple[list[tuple[str, str]], list[Reject], Counter]:
    """The rows of one shard img2dataset must fetch, as (prefix + row index, url); the unsafe ones rejected."""
    wanted, rejects, notes = [], [], Counter()
    for index, (row_id, url, has_image) in enumerate(zip(
            table.column("id").to_pylist(), table.column("url").to_pylist(), image_present(table))):
        if has_image:
            notes["passed_through_with_image"] += 1
            continue
        try:
            policy.check(url or "", resolve=False)  # host names are resolved at connect time, in the workers
            wanted.append((f"{prefix}{index}", url))
        except UnsafeUrl as err:
            rejects.append(Reject(row_id, err.reason, f"{url}: {err.detail}"))
    return wanted, rejects, notes


def image_present(table: pa.Table) -> list[bool]:
    if "image" not in table.column_names:
        return [False] * table.num_rows
    return table.column("image").is_valid().to_pylist()


def column_or(table: pa.Table, name: str, default=None) -> list:
    return table.column(name).to_pylist() if name in table.column_names else [default] * table.num_rows


class RowSlices:
    """Rows of a chunked column as one-row slices of their chunks (no copy), so that a shard's images, gathered
    from its own column and from what img2dataset fetched, are copied once (ChunkedArray.take would first
    concatenate every chunk of its source: each batch's images once per shard)."""

    def __init__(self, column: pa.ChunkedArray | None):
        self.chunks = column.chunks if column is not None else []
        self.starts = np.cumsum([0] + [len(chunk) for chunk in self.chunks])

    def __getitem__(self, row: int) -> pa.Array:
        chunk = int(np.searchsorted(self.starts, row, side="right")) - 1
        return self.chunks[chunk].slice(row - int(self.starts[chunk]), 1)


def shard_result(table: pa.Table, wanted: list[tuple[str, str]], fetched: Fetched, prefix: str,
                 rejects: list[Reject], notes: Counter, cfg) -> ShardResult:
    """One shard's rows: passed-through images, fetched images, and a rejection for every other row."""
    asked = {key for key, _ in wanted}
    ids, urls = table.column("id").to_pylist(), column_or(table, "url")
    has_image, widths, heights = image_present(table), column_or(table, "width"), column_or(table, "height")
    kept, image_from = [], []  # output rows (input row index), and where each one's image is: (False, input row) / (True, fetched row)
    sizes = []
    for index, row_id in enumerate(ids):
        if has_image[index]:
            kept.append(index)
            image_from.append((False, index))
            sizes.append((widths[index], heights[index]))
            continue
        key = f"{prefix}{index}"
        if key not in asked:
            continue  # an unsafe URL, rejected by urls_to_fetch
        at = fetched.position.get(key)
        if at is None:
            rejects.append(Reject(row_id, "download_missing", f"img2dataset returned no row for {urls[index]}"))
        elif fetched.status[at] != "success":
            error = fetched.error[at]
            rejects.append(Reject(row_id, failure_reason(error), f"{urls[index]}: {error}"))
        else:
            kept.append(index)
            image_from.append((True, at))
            sizes.append((fetched.width[at], fetched.height[at]))
            notes.update(fetched.conversions.get(key, {}))
    own, downloaded = RowSlices(table.column("image") if any(has_image) else None), RowSlices(fetched.images)
    slices = [downloaded[i] if from_fetch else own[i] for from_fetch, i in image_from]
    images = pa.concat_arrays(slices) if slices else pa.array([], pa.binary())
    pick = lambda values: [values[i] for i in kept]  # noqa: E731
    out = {
        "id": pick(ids), "image": images,
        "width": [w for w, _ in sizes], "height": [h for _, h in sizes], "url": pick(urls),
        "source_caption": pick(column_or(table, "source_caption")), "origin": pick(column_or(table, "origin", "retrieval")),
        "similarity": pick(column_or(table, "similarity")), "query": pick(column_or(table, "query")),
        "pwatermark": pick(column_or(table, "pwatermark")), "punsafe": pick(column_or(table, "punsafe")),
    }
    return ShardResult(pa.table(out, schema=IMAGE_SCHEMA), rejects, notes)


def start_batch(fetcher, tables: list[pa.Table], cfg, policy: UrlPolicy) -> list[Callable[[], ShardResult]]:
    """Start fetching the URLs of several shards, split evenly over the fetcher's processes; returns, per shard,
    the call that waits for its downloads and gives its result."""
    checked = [urls_to_fetch(table, policy, f"{i}/") for i, table in enumerate(tables)]
    groups = [urls for urls, _, _ in checked]
    wanted = sum(map(len, groups))
    nothing = lambda: Fetched(None, cfg.encode_format)  # noqa: E731
    fetches = fetcher.submit(groups, math.ceil(wanted / fetcher.processes)) if wanted else [nothing] * len(groups)
    return [functools.partial(finish_shard, table, urls, fetch, f"{i}/", rejects, notes, cfg)
            for i, (table, (urls, rejects, notes), fetch) in enumerate(zip(tables, checked, fetches))]


def finish_shard(table: pa.Table, wanted: list[tuple[str, str]], fetch: Callable[[], Fetched], prefix: str,
                 rejects: list[Reject], notes: Counter, cfg) -> ShardResult:
    """The shard's result; ShardNotFinal if more of its URLs failed transiently than download.max_transient_fraction
    (a rerun fetches them again, instead of a brief outage becoming permanent rejections)."""
    result = shard_result(table, wanted, fetch(), prefix, rejects, notes, cfg)
    transient = Counter(r.reason for r in result.rejects if is_transient(r.reason))
    if sum(transient.values()) > cfg.max_transient_fraction * len(wanted):
        raise ShardNotFinal(f"{sum(transient.values())} of {len(wanted)} URLs failed transiently, more than "
                            f"download.max_transient_fraction {cfg.max_transient_fraction:g}: "
                            + ", ".join(f"{reason} {count}" for reason, count in sorted(transient.items()))
                            + "; was the network or were the sites down? If they are gone for good, raise the fraction")
    return result


DISTRIBUTORS = ("multiprocessing", "pyspark", "ray")


def check_settings(config) -> None:
    """The download settings alone, checked before any URL is read (and by the driver before any stage)."""
    from pipeline_configs import ConfigError

    cfg = config.download
    if cfg.distributor not in DISTRIBUTORS:
        raise ConfigError(f"download.distributor must be one of {', '.join(DISTRIBUTORS)}, got {cfg.distributor!r}")
    for name in ("processes_count", "thread_count"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"download.{name} must be at least 1, got {getattr(cfg, name)}")
    if cfg.batch_rows < 0:
        raise ConfigError(f"download.batch_rows must be 0 (one shard at a time) or more, got {cfg.batch_rows}")
    for name in ("max_body_bytes", "max_image_area"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"download.{name} must be at least 1, got {getattr(cfg, name)}")
    if not 0 <= cfg.max_transient_fraction <= 1:
        raise ConfigError(f"download.max_transient_fraction must be between 0 and 1, got {cfg.max_transient_fraction}")
    for network in cfg.allowed_networks:
        try:
            ipaddress.ip_network(network, strict=False)
        except ValueError as err:
            raise ConfigError(f"download.allowed_networks: {err}") from None
    if cfg.proxy and not proxy_is_valid(cfg.proxy):
        raise ConfigError(f"download.proxy must be empty or http(s)://host:port, got {cfg.proxy!r}")


def proxy_is_valid(proxy: str) -> bool:
    """http(s)://host:port and nothing else (credentials would travel in the config)."""
    try:
        parts = urllib.parse.urlsplit(proxy)
        port = parts.port
    except ValueError:
        return False
    return (parts.scheme in ("http", "https") and bool(parts.hostname) and port is not None and parts.path in ("", "/")
            and not (parts.query or parts.fragment or parts.username or parts.password))


def run(config, inputs: dict[str, Manifest], output_uri: str) -> Manifest:
    check_settings(config)
    cfg = config.download
    if cfg.distributor != "multiprocessing":
        # img2dataset ships its downloader to the cluster's executors, which never import our guard.
        print(f"download: distributor {cfg.distributor!r} runs img2dataset on your cluster's executors; the URL guard "
              "(private addresses, download.proxy, body and image caps) covers this process only, so restrict the "
              "executors' egress with a network policy", file=sys.stderr)
    if cfg.proxy:
        print(f"download: every fetch goes through download.proxy {cfg.proxy}; what each URL says is still checked here, "
              "but the proxy resolves host names: refusing the internal addresses it resolves is its job", file=sys.stderr)
    policy = UrlPolicy.from_config(cfg)
    os.environ[ENV_VAR] = policy.to_env()  # for the guard in img2dataset's worker processes
    url_guard.install(policy)
    fetcher = Img2datasetPool if cfg.distributor == "multiprocessing" else Img2datasetCalls
    return run_pipelined(
        STAGE, list(inputs.values()), output_uri, config.section_hash("download"), IMAGE_SCHEMA,
        lambda running, batch: start_batch(running, [table for table, _ in batch], cfg, policy), cfg.batch_rows,
        worker=lambda: fetcher(cfg),
    )
