"""Download: every URL row becomes an image (via img2dataset) or a rejection with img2dataset's reason.

Rows that already carry an image (the seeds) pass through, so this stage's output is the whole
image set that captioning and conditioning work on. One img2dataset call per input shard keeps
our commit-per-shard resume; img2dataset's processes and threads parallelise inside the shard.
"""
from __future__ import annotations

import contextlib
import glob
import os
import re
import sys
import tempfile
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq

from cnpipe.dataset import Manifest, Reject, ShardResult
from cnpipe.stage import run_per_shard
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
    ]
)


def failure_reason(message: str | None) -> str:
    """Fold img2dataset's free-text error messages into a few stable reasons (the text stays in `detail`)."""
    text = (message or "").lower()
    code = re.search(r"http error (\d{3})", text)
    if code:
        return f"http_{code.group(1)}"
    for needle, reason in (
        ("unsafe redirect", "unsafe_redirect"), ("dns_failure", "dns_failure"), ("connection refused", "connection_error"), ("refused", "unsafe_address"),
        ("timed out", "timeout"), ("timeout", "timeout"), ("too small", "too_small"), ("aspect ratio", "bad_aspect_ratio"),
        ("too large", "too_large"), ("cannot identify", "not_an_image"), ("truncated", "truncated_image"),
        ("decod", "not_an_image"), ("x-robots-tag", "opted_out"), ("connection", "connection_error"),
        ("name or service", "dns_failure"),
    ):
        if needle in text:
            return reason
    return "download_error"


@contextlib.contextmanager
def guarded_spawned_workers():
    """img2dataset's workers are spawned processes, and a spawned child imports nothing of ours but the
    parent's main module (never a package's `__main__`, e.g. `python -m components.download`'s). So while
    they start, the main module is url_guard, whose import as a child's main installs the guard there."""
    from components.download import url_guard

    saved = sys.modules["__main__"]
    sys.modules["__main__"] = url_guard
    try:
        yield
    finally:
        sys.modules["__main__"] = saved


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


def fetch(urls: list[tuple[str, str]], cfg) -> dict[str, dict]:
    """Run img2dataset on (id, url) pairs; return id -> its output row (status, error_message, jpg, ...)."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # else its import phones home (here and in the workers)
    import img2dataset

    with tempfile.TemporaryDirectory(prefix="cnpipe-dl-") as tmp:
        pq.write_table(pa.table({"url": [u for _, u in urls], "id": [i for i, _ in urls]}), f"{tmp}/urls.parquet")
        with quiet_file_descriptors(f"{tmp}/img2dataset.log"), guarded_spawned_workers():
            img2dataset.download(
                url_list=f"{tmp}/urls.parquet", input_format="parquet", url_col="url", save_additional_columns=["id"],
                output_format="parquet", output_folder=f"{tmp}/out", number_sample_per_shard=len(urls) + 1,
                image_size=cfg.image_size, resize_mode=cfg.resize_mode, resize_only_if_bigger=True,
                min_image_size=cfg.min_image_size, max_aspect_ratio=cfg.max_aspect_ratio, max_image_area=89_478_485,
                timeout=cfg.timeout_s, retries=cfg.retries, thread_count=cfg.thread_count,
                processes_count=cfg.processes_count, encode_format=cfg.encode_format, encode_quality=cfg.encode_quality,
                user_agent_token=cfg.user_agent_token, disallowed_header_directives=cfg.disallowed_header_directives,
                incremental_mode="incremental", enable_wandb=False, compute_hash=None, extract_exif=False,
                distributor=cfg.distributor,
            )
        rows: dict[str, dict] = {}
        for path in sorted(glob.glob(f"{tmp}/out/*.parquet")):
            for row in pq.read_table(path).to_pylist():
                rows[row["id"]] = row
        return rows


def download_shard(table: pa.Table, cfg, policy: UrlPolicy) -> ShardResult:
    columns = set(table.column_names)
    records = table.to_pylist()
    rejects, notes, wanted = [], Counter(), []
    for record in records:
        if record.get("image") is not None:
            notes["passed_through_with_image"] += 1
            continue
        try:
            policy.check(record["url"] or "")
            wanted.append((record["id"], record["url"]))
        except UnsafeUrl as err:
            rejects.append(Reject(record["id"], err.reason, f"{record['url']}: {err.detail}"))
    fetched = fetch(wanted, cfg) if wanted else {}
    wanted_ids = {i for i, _ in wanted}
    out = {name: [] for name in IMAGE_SCHEMA.names}
    for record in records:
        if record.get("image") is None and record["id"] not in wanted_ids:
            continue  # refused above
        image, width, height = record.get("image"), record.get("width"), record.get("height")
        if image is None:
            got = fetched.get(record["id"])
            if got is None:
                rejects.append(Reject(record["id"], "download_missing", f"img2dataset returned no row for {record['url']}"))
                continue
            if got["status"] != "success":
                rejects.append(Reject(record["id"], failure_reason(got.get("error_message")), f"{record['url']}: {got.get('error_message')}"))
                continue
            image, width, height = got[cfg.encode_format], got["width"], got["height"]
        values = {
            "id": record["id"], "image": image, "width": width, "height": height, "url": record.get("url"),
            "source_caption": record.get("source_caption"),
            "origin": record.get("origin") if "origin" in columns else "retrieval",
            "similarity": record.get("similarity"), "query": record.get("query"),
        }
        for name in IMAGE_SCHEMA.names:
            out[name].append(values[name])
    return ShardResult(pa.table(out, schema=IMAGE_SCHEMA), rejects, notes)


DISTRIBUTORS = ("multiprocessing", "pyspark", "ray")


def run(config, inputs: dict[str, Manifest], output_uri: str) -> Manifest:
    cfg = config.download
    if cfg.distributor not in DISTRIBUTORS:
        from pipeline_configs import ConfigError

        raise ConfigError(f"download.distributor must be one of {', '.join(DISTRIBUTORS)}, got {cfg.distributor!r}")
    if cfg.distributor != "multiprocessing":
        # img2dataset ships its downloader to the cluster's executors, which never import our guard.
        print(f"download: distributor {cfg.distributor!r} runs img2dataset on your cluster's executors; the private-address "
              "guard covers this process only, so restrict the executors' egress with a network policy", file=sys.stderr)
    policy = UrlPolicy(cfg.allow_file_urls, list(cfg.allowed_networks))
    os.environ[ENV_VAR] = policy.to_env()  # for the guard in img2dataset's spawned workers
    from components.download import url_guard

    url_guard.install(policy)
    return run_per_shard(
        STAGE, list(inputs.values()), output_uri, config.section_hash("download"), IMAGE_SCHEMA,
        lambda table, _: download_shard(table, cfg, policy),
    )
