"""laion_retrieval against a kNN service that misbehaves: the answer is capped in bytes and in time, an answer
that cannot be read is retried and then named in one clear error, and a bad row is rejected with a reason
while the stage goes on. Every case runs the real stage (components.laion_retrieval.stage.run) in-process
against a loopback server."""
from __future__ import annotations

import json
import time

import pytest

from components.laion_retrieval.knn_client import KnnServiceError
from components.registry import check_settings
from pipeline_configs import ConfigError
from tests.core.knn_server import KnnServer, config, row, run_stage


@pytest.fixture
def server():
    running = KnnServer()
    yield running
    running.close()


# (JSON of one result, what the rejection's detail says)
MALFORMED = [
    ("7", "result is a number, not an object"),
    ('"http://images.example.com/s.jpg"', "result is a string, not an object"),
    ("null", "result is null, not an object"),
    ('[{"url": "http://images.example.com/l.jpg", "similarity": 0.5}]', "result is an array, not an object"),
    ('{"url": 5, "similarity": 0.5}', "url is a number, not a string"),
    ('{"url": ["http://images.example.com/a.jpg"], "similarity": 0.5}', "url is an array, not a string"),
    ('{"url": "http://x.example/1.jpg", "caption": {"t": 1}, "similarity": 0.5}', "caption is an object, not a string or null"),
    ('{"url": "http://x.example/2.jpg", "caption": 3, "similarity": 0.5}', "caption is a number, not a string or null"),
    ('{"url": "http://x.example/3.jpg", "similarity": null}', "similarity is null, not a number"),
    ('{"url": "http://x.example/4.jpg", "similarity": "0.9"}', "similarity is a string, not a number"),
    ('{"url": "http://x.example/5.jpg", "similarity": true}', "similarity is a boolean, not a number"),
    ('{"url": "http://x.example/6.jpg", "caption": "c"}', "similarity is missing"),
    ('{"url": "http://x.example/7.jpg", "similarity": NaN}', "similarity nan is not a finite float32"),
    ('{"url": "http://x.example/8.jpg", "similarity": 1e39}', "similarity 1e+39 is not a finite float32"),
    ('{"url": "http://x.example/9.jpg", "similarity": 1' + "0" * 400 + "}", "similarity 1000000000000000000000000000000000000000 is not a finite float32"),
    ('{"url": "http://x.example/\\ud800.jpg", "similarity": 0.5}', "url is not valid text (a lone surrogate)"),
]


def test_malformed_rows_are_rejected_with_the_field_and_the_stage_goes_on(tmp_path, server):
    results = (
        [json.dumps(row(0)), json.dumps(row(1))]
        + [text for text, _ in MALFORMED]
        + [json.dumps({"caption": "no url", "similarity": 0.5}),  # missing_url
           json.dumps(row(0)),  # duplicate_url
           json.dumps(row(2, similarity=0.05)),  # below_min_similarity
           json.dumps(row(3)),  # kept: the third URL
           json.dumps(row(4))]  # over_max_urls
    )
    body = ("[" + ", ".join(results) + "]").encode()
    server.answer = lambda handler: server.send_raw(handler, body)

    manifest = run_stage(tmp_path, config(server.url, num_images=len(results), min_similarity=0.1, max_urls=3))

    assert manifest.rows_in == len(results) == manifest.rows_out + manifest.rows_rejected
    assert manifest.rows_out == 3
    assert manifest.rejections == {"malformed_result": len(MALFORMED), "missing_url": 1, "duplicate_url": 1,
                                   "below_min_similarity": 1, "over_max_urls": 1}
    rejected = manifest.rejected_table().to_pylist()
    details = [r["detail"] for r in rejected if r["reason"] == "malformed_result"]
    for position, (_, reason) in enumerate(MALFORMED, start=2):
        assert f"{reason} (result {position} of prompt:a cat)" in details
    kept = [t for _, t in manifest.iter_shards()][0].to_pylist()
    assert [r["url"] for r in kept] == [row(i)["url"] for i in (0, 1, 3)]
    assert [r["source_caption"] for r in kept] == ["caption 0", "caption 1", "caption 3"]


def test_results_beyond_num_images_are_rejected(tmp_path, server):
    server.answer = lambda handler: server.send_json(handler, [row(i) for i in range(8)])

    manifest = run_stage(tmp_path, config(server.url, num_images=5))

    assert (manifest.rows_in, manifest.rows_out, manifest.rejections) == (8, 5, {"over_num_images": 3})
    assert [r["url"] for _, t in manifest.iter_shards() for r in t.to_pylist()] == [row(i)["url"] for i in range(5)]


def test_an_answer_over_max_response_bytes_is_refused_at_once_when_announced(tmp_path, server):
    def announce_a_gigabyte(handler):
        server.send_raw(handler, b"", headers={"Content-Length": str(2**30)})
        time.sleep(3)  # and never send it: waiting for the body would be the client's mistake

    server.answer = announce_a_gigabyte
    started = time.monotonic()
    with pytest.raises(KnnServiceError, match=r"failed after 2 tries: answer of 1073741824 bytes is over retrieval.max_response_bytes=65536"):
        run_stage(tmp_path, config(server.url, max_response_bytes=65536, timeout_s=2.0))
    assert len(server.requests) == 2
    assert time.monotonic() - started < 2.0  # refused from the header, plus one backoff


def test_an_answer_over_max_response_bytes_is_refused_while_it_streams(tmp_path, server):
    big = json.dumps([row(i) for i in range(20_000)]).encode()  # about 2 MB, no Content-Length
    server.answer = lambda handler: server.send_raw(handler, big, headers={"Content-Length": None, "Connection": "close"})

    with pytest.raises(KnnServiceError, match=r"failed after 2 tries: answer is over retrieval.max_response_bytes=65536 bytes"):
        run_stage(tmp_path, config(server.url, max_response_bytes=65536))
    assert len(server.requests) == 2


@pytest.mark.parametrize("phase", ["headers", "body"])
def test_a_slow_drip_is_cut_at_the_query_deadline(tmp_path, server, phase):
    """A byte every 0.1 s never trips the 1 s per-read timeout; the deadline of the whole try ends it."""
    def drip(handler):
        if phase == "headers":
            handler.wfile.write(b"HTTP/1.1 200 OK\r\n")
            server.drip(handler, b"Content-Type: application/json\r\nX-Padding: " + b"." * 40 + b"\r\nContent-Length: 2\r\n\r\n[]", 0.1)
        else:
            handler.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n")
            server.drip(handler, b"[" + b" " * 80 + b"]", 0.1)

    server.answer = drip
    started = time.monotonic()
    with pytest.raises(KnnServiceError, match=r"failed after 2 tries: no whole answer within retrieval.query_deadline_s=0.6 s"):
        run_stage(tmp_path, config(server.url, timeout_s=1.0, query_deadline_s=0.6))
    assert time.monotonic() - started < 4.0  # two tries of 0.6 s and a 0.5 s backoff; the drip lasts 8 s a try
    assert len(server.requests) == 2


def test_deeply_nested_json_is_retried_then_a_clear_error(tmp_path, server):
    nested = b"[" * 200_000 + b"]" * 200_000
    server.answer = lambda handler: server.send_raw(handler, nested)

    with pytest.raises(KnnServiceError, match=rf"kNN service {server.url} failed after 2 tries: the answer's JSON is nested too deeply"):
        run_stage(tmp_path, config(server.url))
    assert len(server.requests) == 2


@pytest.mark.parametrize("body", [b'{"results": []}', b'"results"', b"null", b"not json"])
def test_an_answer_that_is_not_a_list_is_retried_then_a_clear_error(tmp_path, server, body):
    server.answer = lambda handler: server.send_raw(handler, body)

    with pytest.raises(KnnServiceError, match=rf"kNN service {server.url} failed after 2 tries: (answered a JSON|the answer is not JSON)"):
        run_stage(tmp_path, config(server.url))
    assert len(server.requests) == 2


def test_a_bad_answer_is_retried_and_the_next_good_one_kept(tmp_path, server):
    def first_bad_then_good(handler):
        if len(server.requests) == 1:
            server.send_raw(handler, b"[" * 200_000 + b"]" * 200_000)
        else:
            server.send_json(handler, [row(i) for i in range(3)])

    server.answer = first_bad_then_good
    manifest = run_stage(tmp_path, config(server.url))
    assert (len(server.requests), manifest.rows_in, manifest.rows_out) == (2, 3, 3)


def test_retrieval_settings_that_cannot_work_fail_before_any_task():
    """Checked with every stage's settings by run, compile and submit (components.registry.check_settings)."""
    with pytest.raises(ConfigError) as err:
        check_settings(config("ftp://knn.example.com/knn-service", num_images=0, query_deadline_s=0, max_response_bytes=0))
    for problem in ("retrieval.num_images must be at least 1", "retrieval.query_deadline_s must be positive",
                    "retrieval.max_response_bytes must be positive", "retrieval.service_url must be an http(s) URL"):
        assert problem in str(err.value)
    check_settings(config("https://user:pw@knn.example.com/knn-service"))
