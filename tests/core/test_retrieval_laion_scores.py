"""laion_retrieval keeps LAION's watermark and unsafe probabilities (pwatermark, punsafe) where the kNN service returns
them, null where it does not, so that curate can filter on them; a score that is not a probability is a
malformed_result. The real stage, in-process, against a loopback /knn-service."""
from __future__ import annotations

import json

import pytest

from tests.core.knn_server import KnnServer, config, row, run_stage


@pytest.fixture
def server():
    running = KnnServer()
    yield running
    running.close()


def answer_with(server: KnnServer, results: list[str]) -> None:
    body = ("[" + ", ".join(results) + "]").encode()
    server.answer = lambda handler: server.send_raw(handler, body)


def test_scores_returned_by_the_service_are_kept_and_absent_ones_are_null(tmp_path, server):
    answer_with(server, [
        json.dumps({**row(0), "pwatermark": 0.8, "punsafe": 0.05}),
        json.dumps({**row(1), "pwatermark": 0, "punsafe": 1}),  # integers are numbers too
        json.dumps(row(2)),  # a back end whose columns_to_return lists neither
        json.dumps({**row(3), "pwatermark": None, "punsafe": None}),
        json.dumps({**row(4), "punsafe": 0.7}),
        '{"id": 5, "url": "http://images.example.com/5.jpg", "similarity": 0.9, "pwatermark": NaN, "punsafe": 0.2}',
    ])
    manifest = run_stage(tmp_path, config(server.url))
    assert manifest.rows_in == 6 == manifest.rows_out and manifest.rows_rejected == 0
    assert {"pwatermark", "punsafe"} <= set(manifest.arrow_schema().names)
    rows = {r["id"]: r for _, t in manifest.iter_shards() for r in t.to_pylist()}
    got = {r["url"].rsplit("/", 1)[1]: (r["pwatermark"], r["punsafe"]) for r in rows.values()}
    assert got["0.jpg"] == (pytest.approx(0.8), pytest.approx(0.05))
    assert got["1.jpg"] == (0.0, 1.0)
    assert got["2.jpg"] == got["3.jpg"] == (None, None)
    assert got["4.jpg"] == (None, pytest.approx(0.7))
    assert got["5.jpg"] == (None, pytest.approx(0.2))  # LAION's NaN: the model gave no score


BAD_SCORES = [
    ('"0.9"', "is a string, not a number or null"),
    ("true", "is a boolean, not a number or null"),
    ("[0.1]", "is an array, not a number or null"),
    ("1.5", "1.5 is not a probability between 0 and 1"),
    ("-0.1", "-0.1 is not a probability between 0 and 1"),
    ("Infinity", "inf is not a probability between 0 and 1"),
    ("1" + "0" * 400, "is not a probability between 0 and 1"),
]


@pytest.mark.parametrize("field", ["pwatermark", "punsafe"])
def test_a_score_that_is_not_a_probability_is_a_malformed_result(tmp_path, server, field):
    good = json.dumps({**row(0), "pwatermark": 0.1, "punsafe": 0.1})
    bad = ['{"url": "http://images.example.com/b%d.jpg", "similarity": 0.9, "%s": %s}' % (i, field, text)
           for i, (text, _) in enumerate(BAD_SCORES)]
    answer_with(server, [good, *bad])
    manifest = run_stage(tmp_path, config(server.url, num_images=len(bad) + 1))
    assert manifest.rows_in == len(bad) + 1 == manifest.rows_out + manifest.rows_rejected
    assert manifest.rows_out == 1 and manifest.rejections == {"malformed_result": len(bad)}
    details = sorted((r["detail"] for r in manifest.rejected_table().to_pylist()),
                     key=lambda d: int(d.split("(result ")[1].split()[0]))  # in the answer's order
    for (_, expected), detail in zip(BAD_SCORES, details):
        assert detail.startswith(f"{field} ") and expected in detail, detail
