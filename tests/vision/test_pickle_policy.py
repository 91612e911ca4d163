"""Models load from safetensors only; a pickle checkpoint is refused with a clear message unless the
config's allow_pickle_weights explicitly allows it."""
import os
import pathlib
import subprocess
import sys

import pytest

import pipeline_configs
from cnpipe.embedded import tiny_models

REPO = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def pickled_clip(tmp_path_factory):
    import torch
    from safetensors.torch import load_file

    folder = tmp_path_factory.mktemp("pickled") / "clip"
    tiny_models.build_clip(folder)
    torch.save(load_file(str(folder / "model.safetensors")), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    return folder


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    from PIL import Image

    from cnpipe.dataset import ShardedOutput, ShardResult
    from cnpipe import images
    from components.hub_load.stage import SEED_SCHEMA
    import pyarrow as pa

    out = ShardedOutput(str(tmp_path_factory.mktemp("seeds") / "hub_load"), "hub_load", "h", SEED_SCHEMA)
    blob = images.encode(Image.new("RGB", (48, 48), (200, 30, 30)))
    table = pa.table({"id": ["a"], "image": [blob], "width": [48], "height": [48], "url": [None], "source_caption": ["red"],
                      "origin": ["test"]}, schema=SEED_SCHEMA)
    out.commit("part-0", ShardResult(table), rows_in=1)
    return out.finalize(["part-0"], inputs=[]).uri


def embed(model, seeds, output, allow):
    cfg = pipeline_configs.embedded()
    cfg.clip_embed.model = str(model)
    cfg.allow_pickle_weights = allow
    return subprocess.run([sys.executable, "-m", "components.clip_embed", "--config-json", cfg.to_json(), "--input",
                           f"seeds={seeds}", "--output", str(output)], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


def test_pickle_checkpoint_is_refused_by_default(pickled_clip, seeds, tmp_path):
    done = embed(pickled_clip, seeds, tmp_path / "out", allow=False)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "pickle checkpoints are refused" in done.stderr and "allow_pickle_weights" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_pickle_checkpoint_loads_when_explicitly_allowed(pickled_clip, seeds, tmp_path):
    done = embed(pickled_clip, seeds, tmp_path / "out", allow=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "out" / "manifest.json").exists()
