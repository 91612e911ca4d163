"""SIGKILL in the middle of the model stages (CLIP embed, BLIP caption), then rerun: the output equals
an uninterrupted run's, with no duplicate row, no half shard, and committed shards not redone."""
import os
import pathlib
import subprocess
import sys

import pyarrow as pa
import pytest
from PIL import Image

import pipeline_configs
from cnpipe import images
from cnpipe.dataset import Manifest, ShardedOutput, ShardResult
from cnpipe.embedded import tiny_models
from components.hub_load.stage import SEED_SCHEMA
from tests.stage_kill import kill_after_commits

REPO = pathlib.Path(__file__).resolve().parents[2]
ROWS = 12


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("killed")
    tiny_models.ensure(str(base / "models"))
    out = ShardedOutput(str(base / "seeds"), "hub_load", "h", SEED_SCHEMA)
    names = []
    for i in range(ROWS):  # one row per shard: many commits, so the kill lands between two of them
        blob = images.encode(Image.new("RGB", (48 + i, 40), (6 * i, 255 - 6 * i, 90))) if i != 7 else b"<html>"
        table = pa.table({"id": [f"r{i:02d}"], "image": [blob], "width": [48 + i], "height": [40], "url": [None],
                          "source_caption": [f"caption {i}"], "origin": ["test"]}, schema=SEED_SCHEMA)
        out.commit(f"part-{i:05d}", ShardResult(table), rows_in=1)
        names.append(f"part-{i:05d}")
    cfg = pipeline_configs.embedded(str(base))
    cfg.clip_embed.model = str(base / "models" / "tiny-clip")
    cfg.caption.model = str(base / "models" / "tiny-blip")
    cfg.clip_embed.batch_size = cfg.caption.batch_size = 1
    return cfg, out.finalize(names, inputs=[]).uri


def commits(folder: pathlib.Path) -> dict:
    marks = folder / "_commits"
    return {p.name: p.stat().st_mtime_ns for p in marks.iterdir() if not p.name.startswith(".tmp-")} if marks.exists() else {}


def argv(stage, cfg, seeds, out):
    return [sys.executable, "-m", f"components.{stage}", "--config-json", cfg.to_json(), "--input", f"seeds={seeds}", "--output", str(out)]


@pytest.mark.parametrize("stage", ["clip_embed", "blip_caption"])
def test_sigkilled_stage_resumes_to_the_uninterrupted_result(setup, stage, tmp_path):
    cfg, seeds = setup
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = tmp_path / "resumed"
    kill_after_commits(argv(stage, cfg, seeds, out), env, [out], commits=2)  # between two commits
    before = commits(out)
    assert 2 <= len(before) < ROWS and not (out / "manifest.json").exists()
    (out / "data" / ".tmp-dead-part-00011.parquet").write_bytes(b"half a shard")

    done = subprocess.run(argv(stage, cfg, seeds, out), env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert {k: v for k, v in commits(out).items() if k in before} == before, "finished shards were redone"
    assert not [p for p in out.rglob(".tmp-*")]
    reference = tmp_path / "uninterrupted"
    done = subprocess.run(argv(stage, cfg, seeds, reference), env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    resumed, expected = Manifest.load(str(out)), Manifest.load(str(reference))
    for field in ("shards", "rows_in", "rows_out", "rows_rejected", "rejections", "notes"):
        assert getattr(resumed, field) == getattr(expected, field), field
    assert (resumed.rows_in, resumed.rows_out, resumed.rows_rejected) == (ROWS, ROWS - 1, 1)
    got = pa.concat_tables([t for _, t in resumed.iter_shards()])
    want = pa.concat_tables([t for _, t in expected.iter_shards()])
    assert got.column("id").to_pylist() == want.column("id").to_pylist() and len(set(got.column("id").to_pylist())) == ROWS - 1
    column = "clip_embedding" if stage == "clip_embed" else "blip_caption"
    if stage == "clip_embed":
        import numpy as np

        assert np.allclose(np.array(got.column(column).to_pylist()), np.array(want.column(column).to_pylist()), atol=1e-6)
    else:
        assert got.column(column).to_pylist() == want.column(column).to_pylist()


@pytest.mark.parametrize("stage, model_class", [("clip_embed", "ClipImageEmbedder"), ("blip_caption", "BlipCaptioner")])
def test_a_rerun_that_finds_every_shard_done_loads_no_model(setup, stage, model_class, tmp_path, monkeypatch):
    """A finished stage on rerun costs its manifest check, not a model load (seconds on a real CLIP or BLIP)."""
    import importlib

    module = importlib.import_module(f"components.{stage}.stage")
    cfg, seeds = setup
    first = module.run(cfg, {"seeds": Manifest.load(seeds)}, str(tmp_path / "out"))

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded although every shard was done")

    monkeypatch.setattr(module, model_class, no_model)
    again = module.run(cfg, {"seeds": Manifest.load(seeds)}, str(tmp_path / "out"))
    assert (again.shards, again.rows_out) == (first.shards, first.rows_out)
