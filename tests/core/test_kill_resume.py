"""SIGKILL `python -m components.hub_load` after its first commits, rerun it, and get exactly what an
uninterrupted run gets: same rows and bytes, no duplicates, no temporaries, same accounting; the shards
committed before the kill are not redone."""
from __future__ import annotations

import json
import signal
import subprocess

import numpy as np
import pytest
from PIL import Image

from cnpipe.dataset import Manifest
from components.hub_load.stage import run
from tests.stage_kill import commit_markers, kill_after_commits

NUM_IMAGES = 60
ROWS_PER_SHARD = 4


@pytest.fixture(scope="module")
def seed_folder(tmp_path_factory, images):
    folder = tmp_path_factory.mktemp("kill-seeds")
    rng = np.random.default_rng(0)
    for i in range(NUM_IMAGES):
        base = images.rgb(480, 360, seed=i)  # big enough that each shard takes a moment (decode, downscale, encode)
        noisy = np.clip(np.asarray(base, dtype=np.int16) + rng.integers(-40, 40, (360, 480, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(folder / f"img_{i:03d}.jpg", quality=90)
        if i % 3 == 0:
            (folder / f"img_{i:03d}.txt").write_text(f"picture number {i}")
    (folder / "img_007.jpg").write_bytes(b"<html>not an image</html>")
    (folder / "img_031.txt").write_bytes(b"\xff\xfe not utf-8")
    return folder


def test_sigkilled_hub_load_resumes_to_the_uninterrupted_result(tmp_path, seed_folder, make_config, cli, dataset_rows, leftover_temporaries):
    argv, env = cli
    config = make_config(kind="folder", source=str(seed_folder), rows_per_shard=ROWS_PER_SHARD, max_image_side=160)
    out = tmp_path / "resumed"
    command = argv("hub_load", config.to_json(), str(out))

    killed = kill_after_commits(command, env, [out])
    assert killed.returncode == -signal.SIGKILL
    assert not (out / "manifest.json").exists(), "the kill came too late: the stage had finished"
    before = commit_markers(out)
    assert 1 <= len(before) < NUM_IMAGES // ROWS_PER_SHARD
    # what a kill in the middle of a write leaves behind
    (out / "data" / ".tmp-0000dead-part-00099.parquet").write_bytes(b"half a shard")

    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    after = commit_markers(out)
    assert {name: after[name] for name in before} == before, "shards committed before the kill were redone"

    reference = tmp_path / "uninterrupted"
    run(config, {}, str(reference))
    resumed, expected = Manifest.load(str(out)), Manifest.load(str(reference))
    for field in ("stage", "config_hash", "schema", "shards", "rows_in", "rows_out", "rows_rejected", "rejections", "notes", "inputs"):
        assert getattr(resumed, field) == getattr(expected, field), field
    assert (summary["rows_in"], summary["rows_out"], summary["rows_rejected"]) == (NUM_IMAGES, NUM_IMAGES - 1, 1)
    assert resumed.rejections == {"not_an_image": 1} and resumed.notes == {"caption_not_utf8": 1}

    resumed_rows, expected_rows = dataset_rows(str(out)), dataset_rows(str(reference))
    assert resumed_rows.column("id").to_pylist() == expected_rows.column("id").to_pylist()
    assert resumed_rows.column("image").to_pylist() == expected_rows.column("image").to_pylist()
    assert resumed_rows.equals(expected_rows)
    ids = resumed_rows.column("id").to_pylist()
    assert len(ids) == len(set(ids)) == NUM_IMAGES - 1
    reasons = ["stage", "id", "reason"]  # detail quotes Pillow's message, which names an object's address
    assert resumed.rejected_table().select(reasons).equals(expected.rejected_table().select(reasons))
    assert leftover_temporaries(str(out)) == []
    assert sorted(p.name for p in (out / "data").iterdir()) == sorted(p.name for p in (reference / "data").iterdir())
