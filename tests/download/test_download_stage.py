"""The download stage end to end against a loopback web (img2dataset really runs, with its spawned
worker): every URL row becomes an image or a rejection with its reason, seed rows that already carry an
image pass through, and the address guard holds before download and on redirects inside the workers."""
from __future__ import annotations

import io
import signal
import socket
from collections import Counter

import pyarrow as pa
import pytest
from PIL import Image

import pipeline_configs
from cnpipe.dataset import Manifest, ShardedOutput, ShardResult
from components.download import stage as download
from components.download.url_guard import ENV_VAR
from components.hub_load.stage import SEED_SCHEMA
from components.laion_retrieval.stage import RETRIEVED_SCHEMA


def write_dataset(uri: str, stage: str, table: pa.Table) -> Manifest:
    output = ShardedOutput(uri, stage, "test", table.schema)
    output.commit("part-00000", ShardResult(table), table.num_rows)
    return output.finalize(["part-00000"], inputs=[])


def retrieved(tmp_path, urls: dict[str, str]) -> Manifest:
    table = pa.table(
        {"id": list(urls), "url": list(urls.values()), "source_caption": [f"caption of {i}" for i in urls],
         "similarity": [0.5] * len(urls), "query": ["prompt:a test"] * len(urls),
         "pwatermark": [None] * len(urls), "punsafe": [None] * len(urls)},
        schema=RETRIEVED_SCHEMA,
    )
    return write_dataset(str(tmp_path / "retrieved"), "laion_retrieval", table)


def seeds(tmp_path, seed_image: bytes, seed_url: str | None = None) -> Manifest:
    """A seed that carries its image, and (given seed_url) a seed from a URL table that does not yet."""
    table = pa.table(
        {"id": ["seed-with-image", "seed-url-only"], "image": [seed_image, None], "width": [40, None], "height": [30, None],
         "url": [None, seed_url], "source_caption": ["a seed", None], "origin": ["folder:seed.jpg", "table:1"]},
        schema=SEED_SCHEMA,
    )
    return write_dataset(str(tmp_path / "seeds"), "hub_load", table if seed_url else table.slice(0, 1))


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def config(**download_settings) -> pipeline_configs.PipelineConfig:
    """The embedded config with download settings set."""
    cfg = pipeline_configs.embedded("/unused")
    cfg.download.processes_count = 1
    cfg.download.thread_count = 4
    cfg.download.retries = 0
    cfg.download.timeout_s = 5
    cfg.download.min_image_size = 32
    for key, value in download_settings.items():
        setattr(cfg.download, key, value)
    return cfg


@pytest.fixture
def isolated_guard(monkeypatch, restore_opener):
    """run() sets the policy variable for img2dataset's workers and installs urllib's guard: undo both."""
    monkeypatch.setenv(ENV_VAR, "")


def seed_jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), (1, 2, 3)).save(buffer, format="JPEG")
    return buffer.getvalue()


@pytest.mark.parametrize("processes", [1, 2], ids=["one-process", "two-processes"])
def test_download_matrix(tmp_path, web, web_elsewhere, isolated_guard, processes):
    urls = {
        "good": web.url("/good.jpg"),
        "redirect-good": web.redirect(web.url("/good.jpg")),
        "missing": web.url("/missing.jpg"),
        "html": web.url("/page.jpg"),
        "tiny": web.url("/tiny.jpg"),
        "opted-out": web.url("/opted-out.jpg"),
        "redirect-metadata": web.redirect("http://169.254.169.254/latest/meta-data/"),
        "redirect-elsewhere": web.redirect(web_elsewhere.url("/good.jpg")),  # 127.0.0.2: outside 127.0.0.1/32
        "dead": f"http://127.0.0.1:{closed_port()}/gone.jpg",
        "metadata": "http://169.254.169.254/latest/meta-data/",
        "ftp": "ftp://example.com/a.jpg",
    }
    image = seed_jpeg()
    # one batch (img2dataset's workers are spawned processes), its URLs split over `processes` img2dataset shards
    inputs = {"retrieved": retrieved(tmp_path, urls), "seeds": seeds(tmp_path, image)}
    sigint = signal.getsignal(signal.SIGINT)
    cfg = config(allowed_networks=["127.0.0.1/32"], processes_count=processes, max_transient_fraction=1.0)  # "dead" kept
    manifest = download.run(cfg, inputs, str(tmp_path / "out"))
    assert signal.getsignal(signal.SIGINT) is sigint  # no handler of img2dataset's (exit status 0 on Ctrl-C) is left

    assert manifest.rows_in == len(urls) + 1 == manifest.rows_out + manifest.rows_rejected
    rejected = {r["id"]: r for r in manifest.rejected_table().to_pylist()}
    assert {i: r["reason"] for i, r in rejected.items()} == {
        "missing": "http_404",
        "html": "not_an_image",
        "tiny": "too_small",
        "opted-out": "opted_out",
        "redirect-metadata": "unsafe_redirect",
        "redirect-elsewhere": "unsafe_redirect",
        "dead": "connection_error",
        "metadata": "unsafe_address",
        "ftp": "unsupported_scheme",
    }
    assert all(r["stage"] == "download" and r["detail"] for r in rejected.values())
    assert manifest.rejections == dict(sorted(Counter(r["reason"] for r in rejected.values()).items()))
    assert web_elsewhere.requests == []  # the guard ran inside img2dataset's spawned workers
    assert manifest.notes == {"passed_through_with_image": 1}
    assert [s["name"] for s in manifest.shards] == ["laion_retrieval-part-00000", "hub_load-part-00000"]

    rows = {r["id"]: r for _, t in manifest.iter_shards() for r in t.to_pylist()}
    assert sorted(rows) == ["good", "redirect-good", "seed-with-image"]
    passed = rows["seed-with-image"]
    assert passed["image"] == image and (passed["width"], passed["height"]) == (40, 30)
    assert passed["origin"] == "folder:seed.jpg" and passed["source_caption"] == "a seed"
    for row_id in ("good", "redirect-good"):
        row = rows[row_id]
        decoded = Image.open(io.BytesIO(row["image"]))
        assert decoded.format == "JPEG" and decoded.size == (120, 90) == (row["width"], row["height"])
    assert rows["good"]["origin"] == "retrieval" and rows["good"]["source_caption"] == "caption of good"
    assert rows["good"]["similarity"] == pytest.approx(0.5) and rows["good"]["query"] == "prompt:a test"


def test_without_allowed_networks_loopback_urls_are_refused_before_download(tmp_path, web, isolated_guard, monkeypatch):
    fetched = []

    class RecordingPool(download.Img2datasetCalls):
        def submit(self, urls):
            fetched.append(urls)
            return super().submit(urls)

    monkeypatch.setattr(download, "Img2datasetPool", RecordingPool)
    urls = {"good": web.url("/good.jpg"), "redirect": web.redirect("http://169.254.169.254/"),
            "localhost": web.url("/good.jpg").replace("127.0.0.1", "localhost"), "ipv6": "http://[::1]:9/a.jpg"}
    inputs = {"retrieved": retrieved(tmp_path, urls), "seeds": seeds(tmp_path, seed_jpeg(), web.url("/tiny.jpg"))}
    manifest = download.run(config(allowed_networks=[]), inputs, str(tmp_path / "out"))
    assert manifest.rejections == {"unsafe_address": 5}
    assert manifest.rows_out == 1 and manifest.rows_in == 6  # only the seed that carries its image
    assert fetched == [] and web.requests == []  # img2dataset never ran, nothing was requested


@pytest.mark.parametrize(
    "message, reason",
    [
        ("cnpipe-fetch: http_404", "http_404"),
        ("cnpipe-fetch: connection_error (ConnectionRefusedError)", "connection_error"),
        ("cnpipe-fetch: unsafe_address (10.0.0.1)", "unsafe_address"),
        ("cnpipe-fetch: unsafe_redirect (169.254.169.254)", "unsafe_redirect"),
        ("cnpipe-fetch: timeout (TimeoutError)", "timeout"),
        ("cnpipe-fetch: dns_failure (gaierror)", "dns_failure"),
        ("cnpipe-fetch: decompression_bomb (12000x12000 pixels > 89478485)", "decompression_bomb"),
        ("image too small", "too_small"),
        ("aspect ratio too large", "bad_aspect_ratio"),
        ("image area too large", "decompression_bomb"),  # hub_load's name for an area over the cap
        ("cnpipe-fetch: truncated_image (image file is truncated)", "truncated_image"),
        ("cnpipe-fetch: empty_image (zero bytes)", "empty_image"),
        ("Image decoding error", "not_an_image"),
        ("Use of image disallowed by X-Robots-Tag directive", "opted_out"),
        ("HTTP Error 503: Service Unavailable", "http_503"),  # urllib's, from executors without the guard
        # free text is never searched: it may hold the URL, which would pick its own reason
        ("unknown url type: 'x://a/HTTP Error 404: timed out'", "download_error"),
        ("<urlopen error refused http://10.0.0.1/HTTP Error 404: unsafe_address>", "download_error"),
        ("URL can't contain control characters. 'cnpipe-fetch: http_404' (found at least ' ')", "download_error"),
        ("cnpipe-fetch: http_404: but then more", "download_error"),
        ("image too small, said http://x/", "download_error"),
        ("The read operation timed out", "download_error"),
        ("something new", "download_error"),
        (None, "download_error"),
    ],
)
def test_failure_reasons(message, reason):
    assert download.failure_reason(message) == reason


def test_unknown_distributor_is_refused_before_any_download(tmp_path):
    import pipeline_configs
    from components.download import stage

    cfg = pipeline_configs.embedded()
    cfg.download.distributor = "dask"
    with pytest.raises(pipeline_configs.ConfigError, match="download.distributor"):
        stage.run(cfg, {}, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_shard_keeps_input_order_when_passed_through_and_downloaded_images_interleave():
    """Rows of one shard: own images and downloaded ones alternate; the output keeps the input order, each row with
    its own image bytes, and a failed download is rejected with img2dataset's reason."""
    table = pa.table({"id": ["a", "b", "c", "d", "e"], "image": [None, b"own-b", None, b"own-d", None],
                      "width": [None, 1, None, 2, None], "height": [None, 1, None, 2, None],
                      "url": ["http://x/a", None, "http://x/c", None, "http://x/e"], "source_caption": list("abcde"),
                      "origin": ["table:0", "folder:b", "table:2", "folder:d", "table:4"]}, schema=SEED_SCHEMA)
    wanted = [("0/0", "http://x/a"), ("0/2", "http://x/c"), ("0/4", "http://x/e")]
    got = pa.table({"row_key": ["0/4", "0/0", "0/2"], "status": ["success", "success", "failed_to_download"],
                    "error_message": [None, None, "HTTP Error 404: Not Found"], "width": [5, 3, None],
                    "height": [5, 3, None], "jpg": [b"fetched-e", b"fetched-a", None]})
    result = download.shard_result(table, wanted, download.Fetched(got, "jpg"), "0/", [], Counter(), config().download)
    rows = result.table.to_pylist()
    assert [(r["id"], r["image"], r["width"]) for r in rows] == [
        ("a", b"fetched-a", 3), ("b", b"own-b", 1), ("d", b"own-d", 2), ("e", b"fetched-e", 5)]
    assert [r["origin"] for r in rows] == ["table:0", "folder:b", "folder:d", "table:4"]
    assert [(r.id, r.reason) for r in result.rejects] == [("c", "http_404")]


def test_an_error_mid_stage_stops_the_download_workers_at_once(tmp_path, web, isolated_guard, monkeypatch):
    """The next batch is downloading while a shard is committed: when that commit fails, the workers are stopped
    (nothing they fetch could be committed) instead of the stage waiting, at its exit, for their whole task."""
    import multiprocessing
    import time

    web.photo_delay_s = 0.5  # the second batch: 12 photos on one thread, 6 s of downloading
    output = ShardedOutput(str(tmp_path / "retrieved"), "laion_retrieval", "test", RETRIEVED_SCHEMA)
    for shard, count in enumerate((1, 12)):
        ids = [f"u{shard}-{row}" for row in range(count)]
        output.commit(f"part-{shard:05d}", ShardResult(pa.table(
            {"id": ids, "url": [web.url(f"/photo/{i}.jpg") for i in ids], "source_caption": ids,
             "similarity": [0.5] * count, "query": ["q"] * count, "pwatermark": [None] * count, "punsafe": [None] * count},
            schema=RETRIEVED_SCHEMA)), count)
    source = output.finalize(["part-00000", "part-00001"], inputs=[])

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ShardedOutput, "commit", full_disk)
    cfg = config(allowed_networks=["127.0.0.1/32"], batch_rows=1, thread_count=1)
    with pytest.raises(OSError, match="No space left"):
        download.run(cfg, {"retrieved": source}, str(tmp_path / "out"))
    stopped = time.monotonic()
    while multiprocessing.active_children() and time.monotonic() - stopped < 3:
        time.sleep(0.05)
    assert multiprocessing.active_children() == []
    requests = len(web.requests)
    time.sleep(1.0)
    assert len(web.requests) == requests < 1 + 12  # nothing more was fetched after the error


def test_cluster_distributors_path_fetches_what_the_worker_pool_fetches(web, restore_opener, monkeypatch):
    """pyspark and ray go through img2dataset.download() (Img2datasetCalls); run that path here with img2dataset's
    multiprocessing distributor: the same rows come back, by key, as from the stage's own worker pool."""
    from components.download.img2dataset_pool import Img2datasetPool
    from components.download.url_guard import UrlPolicy

    cfg = config(allowed_networks=["127.0.0.1/32"]).download
    groups = [[("0/0", web.url("/good.jpg")), ("0/1", web.url("/missing.jpg"))], [("1/0", web.url("/tiny.jpg"))]]
    monkeypatch.setenv(ENV_VAR, UrlPolicy(allowed_networks=["127.0.0.1/32"]).to_env())  # for the pool's workers
    fetched = {}
    for name, fetcher in (("pool", Img2datasetPool(cfg)), ("calls", download.Img2datasetCalls(cfg))):
        with fetcher:
            finishers = fetcher.submit(groups, 2)
            assert len(finishers) == len(groups)
            results = [finish() for finish in finishers]
        fetched[name] = {key: (got.status[got.position[key]], got.width[got.position[key]], got.error[got.position[key]])
                         for got, group in zip(results, groups) for key, _ in group}
    reasons = {name: {key: (status, width, error and download.failure_reason(error)) for key, (status, width, error) in got.items()}
               for name, got in fetched.items()}
    assert reasons["pool"] == reasons["calls"] == {
        "0/0": ("success", 120, None), "0/1": ("failed_to_download", None, "http_404"),
        "1/0": ("failed_to_resize", None, "too_small")}
