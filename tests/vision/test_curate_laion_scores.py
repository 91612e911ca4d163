"""curate's LAION filters on rows shaped as download leaves them (pwatermark, punsafe; null where retrieval had none):
a score above curate.max_pwatermark / max_punsafe is rejected as watermarked / unsafe with the score in the detail,
a score at the threshold or without one passes (counted in curate_keys' notes), each filter switches off on its own.
The three steps as kfp runs them (curate_keys, curate_dedup, curate)."""
from __future__ import annotations

import pyarrow as pa
import pytest

from cnpipe.dataset import ShardedOutput, ShardResult
from tests.vision.curate_data import SCORED, encoded, scene
from tests.vision.test_curate import config, every_row, run_all, tiny_models  # noqa: F401

NAN = float("nan")
# id: (pwatermark, punsafe, the verdict with the default thresholds 0.5 / 0.5)
ROWS = {
    "marked": (0.9, 0.01, "watermarked"),
    "at-threshold": (0.5, 0.5, "kept"),
    "unsafe": (0.1, 0.51, "unsafe"),
    "both": (0.9, 0.9, "watermarked"),  # the first filter that applies names the row
    "no-scores": (None, None, "kept"),
    "nan-scores": (NAN, NAN, "kept"),  # LAION's NaN: no score
}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    out = ShardedOutput(str(tmp_path_factory.mktemp("scored") / "images"), "blip_caption", "test", SCORED)
    ids = list(ROWS)
    blobs = [encoded(scene(40 + i)) for i in range(len(ids))]
    n = len(ids)
    table = pa.table({
        "id": ids, "image": blobs, "width": [160] * n, "height": [160] * n, "url": [f"http://web/{i}" for i in ids],
        "source_caption": [None] * n, "origin": ["retrieval"] * n, "similarity": [0.5] * n, "query": ["q"] * n,
        "pwatermark": [ROWS[i][0] for i in ids], "punsafe": [ROWS[i][1] for i in ids],
        "blip_caption": [f"shapes {i}" for i in ids]}, schema=SCORED)
    out.commit("laion_retrieval-part-00000", ShardResult(table), rows_in=n)
    return out.finalize(["laion_retrieval-part-00000"], inputs=[])


def verdicts(out) -> dict[str, str]:
    found = {r["id"]: r["reason"] for r in out.rejected_table().to_pylist()}
    found.update({i: "kept" for i in every_row(out).column("id").to_pylist()})
    return found


def test_rows_above_the_thresholds_are_rejected_with_their_own_reasons(tmp_path, tiny_models, images):  # noqa: F811
    key_set, _, out = run_all(config(tiny_models), images, None, tmp_path)
    assert out.rows_in == len(ROWS) == out.rows_out + out.rows_rejected
    assert verdicts(out) == {i: v for i, (_, _, v) in ROWS.items()}
    assert out.rejections == {"watermarked": 2, "unsafe": 1}
    details = {r["id"]: r["detail"] for r in out.rejected_table().to_pylist()}
    assert details == {"marked": "pwatermark 0.900 > 0.5", "both": "pwatermark 0.900 > 0.5", "unsafe": "punsafe 0.510 > 0.5"}
    # rows that had no score to judge passed, counted: the scoreless rows and the NaN ones
    assert key_set.notes["no_pwatermark_score"] == key_set.notes["no_punsafe_score"] == 2


def test_thresholds_and_switches_are_each_their_own(tmp_path, tiny_models, images):  # noqa: F811
    _, _, out = run_all(config(tiny_models, max_pwatermark=0.95, unsafe_filter=False), images, None, tmp_path)
    assert out.rows_in == out.rows_out == len(ROWS) and out.rejections == {}
    _, _, out = run_all(config(tiny_models, watermark_filter=False, max_punsafe=0.05), images, None, tmp_path / "2")
    assert verdicts(out) == {"marked": "kept", "at-threshold": "unsafe", "unsafe": "unsafe", "both": "unsafe",
                             "no-scores": "kept", "nan-scores": "kept"}
