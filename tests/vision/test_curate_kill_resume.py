"""SIGKILL curate's per-shard steps midway (the commands kfp runs), then rerun: committed shards are not redone, no
half shard is left, and the curated dataset equals an uninterrupted run's, rejected rows and reasons included."""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pyarrow as pa
import pytest

import pipeline_configs
from cnpipe.dataset import Manifest, load_output
from tests.stage_kill import commit_markers, kill_after_commits
from tests.vision.curate_data import make_datasets, rows

REPO = pathlib.Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from cnpipe.embedded import tiny_models
    from components.clip_embed.stage import ClipImageEmbedder

    base = tmp_path_factory.mktemp("curate-killed")
    models = tmp_path_factory.getbasetemp() / "data-half-models"
    tiny_models.ensure(str(models))
    cfg = pipeline_configs.embedded(str(base))
    cfg.clip_embed.model = str(models / "tiny-clip")
    cfg.curate.batch_size, cfg.curate.device = 1, "cpu"
    images, embeddings = make_datasets(base / "in", ClipImageEmbedder(cfg.clip_embed.model, "cpu"), rows_per_shard=1)
    return cfg, images, embeddings


def command(module: str, cfg, inputs: dict, out: pathlib.Path) -> list[str]:
    argv = [sys.executable, "-m", module, "--config-json", cfg.to_json(), "--output", str(out)]
    for name, uri in inputs.items():
        argv += ["--input", f"{name}={uri}"]
    return argv


def run(argv: list[str]) -> None:
    done = subprocess.run(argv, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def step(module: str, argv: list[str], target: pathlib.Path, kill: bool) -> None:
    """Run one step's command; with `kill`, SIGKILL it after two commits first, then run it again."""
    if not kill:
        run(argv)
        return
    kill_after_commits(argv, ENV, [target], commits=2)
    before = commit_markers(target)
    assert 2 <= len(before) < len(rows()) and not (target / "manifest.json").exists()
    (target / "data" / ".tmp-dead-laion_retrieval-part-00013.parquet").write_bytes(b"half a shard")
    run(argv)
    after = commit_markers(target)
    assert {k: v for k, v in after.items() if k in before} == before, "finished shards were redone"
    assert not list(target.rglob(".tmp-*"))


def curate_all(cfg, images: Manifest, embeddings: Manifest, root: pathlib.Path, kill: str = "",
               keys: pathlib.Path | None = None, dedup: pathlib.Path | None = None) -> Manifest:
    """The three steps as commands (keys and dedup: reused when given); `kill`: the step to SIGKILL midway."""
    out = root / "curate"
    if keys is None:
        keys, dedup = root / "curate" / "keys", root / "curate" / "dedup"
        step("components.curate.keys", command("components.curate.keys", cfg, {"images": images.uri, "embeddings": embeddings.uri}, keys),
             keys, kill == "components.curate.keys")
        step("components.curate.dedup", command("components.curate.dedup", cfg, {"keys": str(keys)}, dedup), dedup, False)
    step("components.curate", command("components.curate", cfg, {"images": images.uri, "keys": str(keys), "dedup": str(dedup)}, out),
         out, kill == "components.curate")
    return Manifest.load(str(out))


@pytest.fixture(scope="module")
def uninterrupted(setup, tmp_path_factory) -> pathlib.Path:
    root = tmp_path_factory.mktemp("curate-whole")
    curate_all(*setup, root)
    return root


@pytest.mark.parametrize("killed", ["components.curate.keys", "components.curate"])
def test_sigkilled_curate_resumes_to_the_uninterrupted_result(setup, uninterrupted, tmp_path, killed):
    cfg, images, embeddings = setup
    reuse = {} if killed == "components.curate.keys" else {"keys": uninterrupted / "curate" / "keys",
                                                             "dedup": uninterrupted / "curate" / "dedup"}
    resumed = curate_all(cfg, images, embeddings, tmp_path, kill=killed, **reuse)
    expected = Manifest.load(str(uninterrupted / "curate"))
    for field in ("shards", "rows_in", "rows_out", "rows_rejected", "rejections", "notes"):
        assert getattr(resumed, field) == getattr(expected, field), field
    assert resumed.rows_in == len(rows()) == resumed.rows_out + resumed.rows_rejected
    assert resumed.rejections["duplicate"] == 2 and resumed.rejections["near_duplicate"] == 3
    got = pa.concat_tables([t for _, t in resumed.iter_shards()])
    want = pa.concat_tables([t for _, t in expected.iter_shards()])
    assert got.equals(want) and len(set(got.column("id").to_pylist())) == got.num_rows
    assert resumed.rejected_table().equals(expected.rejected_table())
    if not reuse:
        keys = load_output(str(tmp_path / "curate" / "keys"))
        assert keys.notes == load_output(str(uninterrupted / "curate" / "keys")).notes
