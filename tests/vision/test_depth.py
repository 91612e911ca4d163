"""The depth conditioning type (components/depth), added through the registry, and the per-family split
of the conditioning stage that lets a type live in another image family."""
import io
import json

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

import pipeline_configs
from cnpipe import images
from cnpipe.dataset import Manifest, ShardedOutput, ShardResult, load_output
from components.conditioning import merge
from components.conditioning import stage as conditioning
from components.depth import tiny_model
from components.depth.conditioner import DepthConditioner


@pytest.fixture(scope="module")
def depth_model(tmp_path_factory):
    return tiny_model.ensure(str(tmp_path_factory.mktemp("models")))


def gradient(width=96, height=64):
    ramp = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
    return np.broadcast_to(ramp, (height, width, 3)).astype(np.uint8).copy()


def config(depth_model, types):
    cfg = pipeline_configs.embedded()
    cfg.conditioning.types = types
    cfg.conditioning.depth_model = depth_model
    cfg.conditioning.depth_device = "cpu"
    cfg.conditioning.workers = 1
    return cfg


def test_depth_map_is_same_size_gray_and_spans_the_range(depth_model):
    conditioner = DepthConditioner(config(depth_model, ["depth"]).conditioning)
    rgb = gradient()
    depth = conditioner(rgb)
    assert depth.shape == rgb.shape[:2] and depth.dtype == np.uint8
    assert (np.asarray(images.decode_rgb(images.encode_control(depth))) == depth[:, :, None]).all()  # stored losslessly
    assert depth.min() == 0 and depth.max() == 255
    assert not np.array_equal(conditioner(rgb[:, ::-1].copy()), depth)  # it looks at the image


def test_pickle_weights_are_refused(depth_model, tmp_path):
    import shutil

    import torch

    folder = tmp_path / "pickled"
    shutil.copytree(depth_model, folder)
    from safetensors.torch import load_file

    torch.save(load_file(str(folder / "model.safetensors")), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    with pytest.raises(OSError):
        DepthConditioner(config(str(folder), ["depth"]).conditioning)


def source_dataset(tmp_path) -> Manifest:
    schema = pa.schema([("id", pa.string()), ("image", pa.binary()), ("source_caption", pa.string()), ("blip_caption", pa.string())])
    out = ShardedOutput(str(tmp_path / "captioned"), "blip_caption", "h", schema)
    blobs = [images.encode_array(gradient()), images.encode_array(gradient(64, 64)[:, ::-1].copy()), b"not an image"]
    table = pa.table({"id": ["a", "b", "c"], "image": blobs, "source_caption": ["x", "", None], "blip_caption": ["y", "z", "w"]}, schema=schema)
    out.commit("part-0", ShardResult(table), rows_in=3)
    return out.finalize(["part-0"], inputs=[])


def test_types_split_by_family_then_merged(depth_model, tmp_path, monkeypatch):
    cfg = config(depth_model, ["canny", "depth"])
    source = source_dataset(tmp_path)
    root = str(tmp_path / "conditioning")
    monkeypatch.setenv("CNPIPE_FAMILY", "vision")
    vision_part = conditioning.run(cfg, {"images": source}, root)
    assert set(vision_part.summary["types"]) == {"depth"}
    assert not (tmp_path / "conditioning" / "summary.json").exists()  # not complete: canny is the other family's
    monkeypatch.setenv("CNPIPE_FAMILY", "conditioning")
    conditioning.run(cfg, {"images": source}, root)
    with pytest.raises(Exception, match="no dataset|nothing finished"):
        load_output(root)
    summary = merge.run(cfg, {}, root)
    (tmp_path / "conditioning" / "summary.json").write_text(json.dumps(summary))  # what cnpipe.cli does with it
    types = load_output(root).summary["types"]
    assert list(types) == ["canny", "depth"]
    depth = Manifest.load(types["depth"]["uri"])
    assert (depth.rows_in, depth.rows_out, depth.rows_rejected) == (3, 2, 1)
    assert sum(depth.rejections.values()) == 1 and set(depth.rejections) <= {"not_an_image", "corrupt_image"}
    control = next(depth.iter_shards())[1].column("control")[0].as_py()
    assert Image.open(io.BytesIO(control)).size == (96, 64)


def test_merge_refuses_an_unfinished_family(depth_model, tmp_path):
    with pytest.raises(RuntimeError, match="has not finished"):
        merge.run(config(depth_model, ["canny", "depth"]), {}, str(tmp_path))
