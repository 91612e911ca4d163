"""Transient failures are not final (issue 13): a shard where more than download.max_transient_fraction of the URLs
failed with a connection error, timeout, DNS failure or 5xx is not committed. The stage commits every other shard,
then fails naming it, and a rerun into the same output fetches its URLs again, ending with the rows of a run that
never saw the outage. Below the fraction a shard is committed with its transient failures rejected; permanent
reasons (a 404 here) are final either way."""
from __future__ import annotations

import socket
import urllib.error
from collections import Counter

import pyarrow as pa
import pytest

import pipeline_configs
from cnpipe.dataset import Manifest, ShardedOutput, ShardResult
from cnpipe.stage import ShardsNotFinal
from components.download import stage as download
from components.download import url_guard
from components.laion_retrieval.stage import RETRIEVED_SCHEMA
from test_download_stage import config, isolated_guard  # noqa: F401 (a fixture)

SHARDS, ROWS = 3, 4


def url_shards(tmp_path, web) -> Manifest:
    """SHARDS shards of ROWS photo URLs each; the first shard's last URL is a 404."""
    output = ShardedOutput(str(tmp_path / "retrieved"), "laion_retrieval", "test", RETRIEVED_SCHEMA)
    names = []
    for shard in range(SHARDS):
        ids = [f"u{shard}-{row}" for row in range(ROWS)]
        urls = [web.url(f"/photo/{i}.jpg") for i in ids]
        if shard == 0:
            urls[-1] = web.url("/missing.jpg")
        table = pa.table({"id": ids, "url": urls, "source_caption": ids, "similarity": [0.5] * ROWS,
                          "query": ["prompt:a test"] * ROWS,
                          "pwatermark": [None] * ROWS, "punsafe": [None] * ROWS}, schema=RETRIEVED_SCHEMA)
        names.append(f"part-{shard:05d}")
        output.commit(names[-1], ShardResult(table), ROWS)
    return output.finalize(names, inputs=[])


def committed(out) -> dict[str, bytes]:
    folder = out / "_commits"
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())} if folder.exists() else {}


def test_an_outage_holds_its_shard_back_and_the_rerun_fetches_it_again(tmp_path, web, isolated_guard):
    source = url_shards(tmp_path, web)
    cfg = config(allowed_networks=["127.0.0.1/32"], batch_rows=ROWS)  # one shard per batch: the next one in flight
    out = tmp_path / "out"
    web.failing = {"/photo/u1-0.jpg": "503", "/photo/u1-1.jpg": "drop"}  # the middle shard: 2 of its 4 URLs

    with pytest.raises(ShardsNotFinal) as failed:
        download.run(cfg, {"retrieved": source}, str(out))
    message = str(failed.value)
    assert "part-00001 (2 of 4 URLs failed transiently" in message and "connection_error 1, http_503 1" in message
    assert "part-00000" not in message and "part-00002" not in message and "rerun" in message
    first = committed(out)
    assert sorted(first) == ["part-00000.json", "part-00002.json"]  # the shards after it were committed too
    assert not (out / "manifest.json").exists()

    web.failing.clear()  # the sites are back
    asked_before = Counter(web.requests)
    resumed = download.run(cfg, {"retrieved": source}, str(out))
    asked_again = Counter(web.requests) - asked_before
    assert asked_again == Counter(f"/photo/u1-{row}.jpg" for row in range(ROWS))  # the held-back shard only
    assert {name: committed(out)[name] for name in first} == first

    uninterrupted = download.run(cfg, {"retrieved": source}, str(tmp_path / "uninterrupted"))
    for field in ("config_hash", "shards", "rows_in", "rows_out", "rows_rejected", "rejections", "notes"):
        assert getattr(resumed, field) == getattr(uninterrupted, field), field
    assert (resumed.rows_out, resumed.rejections) == (SHARDS * ROWS - 1, {"http_404": 1})
    rows = lambda manifest: pa.concat_tables([t for _, t in manifest.iter_shards()])  # noqa: E731
    assert rows(resumed).equals(rows(uninterrupted))


def test_a_shard_under_the_fraction_is_committed_with_its_transient_failures_rejected(tmp_path, web, isolated_guard):
    web.failing = {"/photo/u1-0.jpg": "503"}  # 1 of 4 URLs
    cfg = config(allowed_networks=["127.0.0.1/32"], max_transient_fraction=0.3)
    manifest = download.run(cfg, {"retrieved": url_shards(tmp_path, web)}, str(tmp_path / "out"))
    assert manifest.rejections == {"http_404": 1, "http_503": 1}
    assert manifest.rows_out == SHARDS * ROWS - 2


@pytest.mark.parametrize("reason, transient", [
    ("connection_error", True), ("timeout", True), ("dns_failure", True), ("http_500", True), ("http_503", True),
    ("http_429", True), ("download_missing", True),
    ("http_404", False), ("http_403", False), ("not_an_image", False), ("too_small", False), ("unsafe_address", False),
    ("unsafe_redirect", False), ("unsupported_scheme", False), ("file_too_large", False), ("decompression_bomb", False),
    ("truncated_image", False), ("opted_out", False), ("tls_error", False), ("download_error", False),
    ("unknown_host", False),
])
def test_which_reasons_are_transient(reason, transient):
    assert download.is_transient(reason) is transient


def test_a_name_that_does_not_exist_is_final_and_a_failed_lookup_is_not():
    """NXDOMAIN (a dead domain, common among old web URLs) is no outage: only a lookup that failed is retried."""
    assert url_guard.reason_of(socket.gaierror(socket.EAI_NONAME, "Name or service not known"))[0] == "unknown_host"
    wrapped = urllib.error.URLError(socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution"))
    assert url_guard.reason_of(wrapped)[0] == "dns_failure"


@pytest.mark.parametrize("fraction", [-0.1, 1.5])
def test_the_fraction_is_checked_before_any_download(tmp_path, fraction):
    cfg = pipeline_configs.embedded()
    cfg.download.max_transient_fraction = fraction
    with pytest.raises(pipeline_configs.ConfigError, match="download.max_transient_fraction"):
        download.run(cfg, {}, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_a_resume_after_lowering_threads_and_batch_rows_goes_on_and_redoes_nothing(tmp_path, web, isolated_guard):
    """Throughput knobs are not part of the config hash: a stage stopped midway (here: its last commit and manifest
    removed, as a kill leaves it) resumes with fewer threads and smaller batches instead of being refused."""
    source = url_shards(tmp_path, web)
    out = tmp_path / "out"
    download.run(config(allowed_networks=["127.0.0.1/32"], thread_count=4, batch_rows=100), {"retrieved": source}, str(out))
    finished = committed(out)
    (out / "_commits" / "part-00002.json").unlink()
    (out / "manifest.json").unlink()
    web.requests.clear()

    slower = config(allowed_networks=["127.0.0.1/32"], thread_count=1, batch_rows=0, timeout_s=9, retries=2)
    manifest = download.run(slower, {"retrieved": source}, str(out))
    assert sorted(web.requests) == sorted(f"/photo/u2-{row}.jpg" for row in range(ROWS))  # only the unfinished shard
    assert {k: v for k, v in committed(out).items() if k != "part-00002.json"} == {
        k: v for k, v in finished.items() if k != "part-00002.json"}
    assert manifest.rows_in == SHARDS * ROWS
