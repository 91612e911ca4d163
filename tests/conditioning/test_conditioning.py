"""Conditioning: canny edges and OpenPose-style skeletons (MediaPipe), one dataset per type, each row
either kept with its control image or rejected with its reason per type; bad settings fail before work;
a SIGKILLed run resumes to exactly the uninterrupted result."""
from __future__ import annotations

import io
import json
import subprocess

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image, ImageOps

import pipeline_configs
from cnpipe import images, storage
from cnpipe.dataset import Manifest, load_output
from components.conditioning import openpose_style
from components.conditioning.canny import CannyConditioner
from components.conditioning.contract import NoControl
from components.conditioning.pose import PoseConditioner
from components.conditioning.stage import run
from tests.stage_kill import kill_after_commits

PALETTE = {tuple(c) for c in openpose_style.COLORS}


def conditioning_config(**settings) -> pipeline_configs.PipelineConfig:
    config = pipeline_configs.embedded("/unused")
    config.conditioning.workers = 1
    for key, value in settings.items():
        setattr(config.conditioning, key, value)
    return pipeline_configs.from_json(config.to_json())


@pytest.fixture(scope="module")
def pose():
    return PoseConditioner(conditioning_config().conditioning)


def edges(rgb: np.ndarray, low: int, high: int) -> np.ndarray:
    """At the image's own size (detect_resolution 0): plain binary Canny."""
    return CannyConditioner(conditioning_config(canny_low=low, canny_high=high, detect_resolution=0).conditioning)(rgb)


def test_canny_is_binary_edges_same_size_read_back_as_three_equal_channels(astronaut):
    rgb = np.asarray(astronaut.resize((160, 120)))
    out = edges(rgb, 100, 200)
    assert out.shape == (120, 160) and out.dtype == np.uint8
    assert set(np.unique(out).tolist()) == {0, 255}
    stored = images.encode_control(out)
    assert Image.open(io.BytesIO(stored)).mode == "1"  # black and white: 1 bit per pixel
    back = np.asarray(images.decode_rgb(stored))
    assert back.shape == (120, 160, 3) and (back == out[:, :, None]).all()
    counts = [int((edges(rgb, low, high) > 0).sum()) for low, high in ((30, 60), (100, 200), (300, 600))]
    assert counts[0] > counts[1] > counts[2] > 0, counts
    assert (edges(np.asarray(Image.new("RGB", (64, 64), (90, 90, 90))), 100, 200) == 0).all()


def test_control_images_round_trip_exactly(astronaut):
    color = np.asarray(astronaut.resize((50, 40)))
    gray = color[:, :, 1].copy()
    assert (np.asarray(images.decode_rgb(images.encode_control(color))) == color).all()  # RGB order kept
    assert (np.asarray(images.decode_rgb(images.encode_control(gray))) == gray[:, :, None]).all()
    for bad in (color.astype(np.float32), color[:, :, :2], np.zeros((2, 2, 2, 3), np.uint8)):
        with pytest.raises(ValueError, match="control image"):
            images.encode_control(bad)


def test_canny_thresholds_are_checked():
    with pytest.raises(ValueError, match="canny_low"):
        CannyConditioner(conditioning_config(canny_low=200, canny_high=100).conditioning)


def test_pose_draws_a_colored_openpose_skeleton_on_the_astronaut(astronaut, pose):
    rgb = np.asarray(astronaut.resize((192, 160)))
    out = pose(rgb)
    assert out.shape == (160, 192, 3) and out.dtype == np.uint8
    pixels = out.reshape(-1, 3)
    drawn = pixels.any(axis=1)
    assert 0.005 < drawn.mean() < 0.5  # a skeleton on black, not an empty or a filled canvas
    colored = (pixels.max(axis=1) - pixels.min(axis=1)) > 60
    assert colored.sum() > 100
    joints = {tuple(p) for p in np.unique(pixels, axis=0).tolist()} & PALETTE
    assert len(joints) >= conditioning_config().conditioning.pose_min_keypoints


@pytest.mark.parametrize("name", ["flat", "stripes"])
def test_pose_on_a_pattern_is_no_pose(pose, helpers, name):
    image = helpers.flat() if name == "flat" else np.repeat((np.arange(96) // 8 % 2 * 255).astype(np.uint8)[None, :, None], 80, 0).repeat(3, 2)
    with pytest.raises(NoControl) as err:
        pose(np.ascontiguousarray(image))
    assert err.value.reason == "no_pose"


def rows_of(uri: str) -> list[dict]:
    return [row for _, table in Manifest.load(uri).iter_shards() for row in table.to_pylist()]


def test_stage_writes_one_dataset_per_type_with_exact_accounting(tmp_path, astronaut, helpers):
    small = astronaut.resize((128, 128))
    source_rows = [
        {"id": "astronaut", "image": helpers.encode(small, "JPEG"), "source_caption": "an astronaut", "blip_caption": "a man"},
        {"id": "mirrored", "image": helpers.encode(ImageOps.mirror(small)), "source_caption": "  ", "blip_caption": "a person"},
        {"id": "flat", "image": helpers.encode(helpers.flat()), "source_caption": None, "blip_caption": ""},
        {"id": "corrupt", "image": b"\xff\xd8\xff\xe0" + bytes(40), "source_caption": "x"},
        {"id": "no-image", "image": None, "source_caption": "y"},
    ]
    images = helpers.write_captioned(str(tmp_path / "images"), source_rows, rows_per_shard=2)
    out = str(tmp_path / "out")
    summary = run(conditioning_config(types=["canny", "pose"]), {"images": images}, out)

    assert storage.read_json(storage.join(out, "summary.json")) == summary
    assert sorted(summary["types"]) == ["canny", "pose"]
    assert load_output(out).summary == summary
    expected_kept = {"canny": ["astronaut", "mirrored", "flat"], "pose": ["astronaut", "mirrored"]}
    expected_rejected = {
        "canny": {"corrupt": "not_an_image", "no-image": "missing_image"},
        "pose": {"corrupt": "not_an_image", "no-image": "missing_image", "flat": "no_pose"},
    }
    for name in ("canny", "pose"):
        uri = storage.join(out, name)
        manifest = Manifest.load(uri)
        assert summary["types"][name]["uri"] == uri and manifest.stage == f"conditioning/{name}"
        assert manifest.rows_in == len(source_rows) == manifest.rows_out + manifest.rows_rejected
        assert (summary["types"][name]["rows_out"], summary["types"][name]["rows_rejected"]) == (manifest.rows_out, manifest.rows_rejected)
        assert manifest.arrow_schema() == helpers.schema.append(pa.field("caption", pa.string())).append(pa.field("control", pa.binary()))
        rows = {r["id"]: r for r in rows_of(uri)}
        assert list(rows) == expected_kept[name]
        rejected = manifest.rejected_table().to_pylist()
        assert {r["id"]: r["reason"] for r in rejected} == expected_rejected[name]
        assert {r["stage"] for r in rejected} == {f"conditioning/{name}"}
        for row in rows.values():
            control = Image.open(io.BytesIO(row["control"]))
            image = Image.open(io.BytesIO(row["image"]))
            # canny: made at 512 (detect_resolution) and resized back to 128 px, soft as controlnet_aux's; none is 1-bit
            mode = "RGB" if name == "pose" else "1" if row["id"] == "flat" else "L"
            assert control.format == "PNG" and control.mode == mode and control.size == image.size
        assert rows["astronaut"]["caption"] == "an astronaut"  # prefer_source: the source caption ...
        assert rows["mirrored"]["caption"] == "a person"  # ... unless it is blank: then BLIP's
    canny_flat = np.asarray(Image.open(io.BytesIO({r["id"]: r for r in rows_of(storage.join(out, "canny"))}["flat"]["control"])))
    assert (canny_flat == 0).all()  # a flat image has no edges, but it is a valid canny row
    assert Manifest.load(storage.join(out, "canny")).notes == {"empty_caption": 1}  # flat: no caption of either kind
    pose_control = np.asarray(Image.open(io.BytesIO(rows_of(storage.join(out, "pose"))[0]["control"])))
    assert {tuple(p) for p in pose_control.reshape(-1, 3).tolist()} & PALETTE


def test_unknown_conditioning_type_fails_before_any_work(tmp_path, helpers):
    images = helpers.write_captioned(str(tmp_path / "images"), [{"id": "a", "image": helpers.encode(helpers.flat())}], 1)
    with pytest.raises(ValueError) as err:
        run(conditioning_config(types=["canny", "no_such_type"]), {"images": images}, str(tmp_path / "out"))
    assert "'no_such_type'" in str(err.value) and "canny" in str(err.value) and "pose" in str(err.value)
    assert not (tmp_path / "out").exists()


def test_heavy_pose_model_is_a_clear_error_not_a_download_or_a_hang(tmp_path, helpers):
    """pose_model_complexity=2 needs a model MediaPipe would download; with a pool of workers (2 here) the
    error must still surface in the stage's own process instead of killing pool workers over and over."""
    images = helpers.write_captioned(str(tmp_path / "images"), [{"id": "a", "image": helpers.encode(helpers.flat())}], 1)
    config = conditioning_config(pose_model_complexity=2)
    config.conditioning.workers = 2
    out = tmp_path / "out"
    done = subprocess.run(helpers.argv(config.to_json(), str(out), images.uri), env=helpers.env(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    last = [line for line in done.stderr.strip().splitlines() if line.strip()][-1]
    assert last.startswith("ValueError: conditioning.pose_model_complexity=2 needs pose_landmark_heavy.tflite")
    assert not (out / "canny" / "_commits").exists() and not (out / "summary.json").exists()
    with pytest.raises(ValueError, match="must be 0, 1 or 2"):
        PoseConditioner(conditioning_config(pose_model_complexity=3).conditioning)


# ---- SIGKILL and resume -------------------------------------------------------------------------------

NUM_ROWS = 24
ROWS_PER_SHARD = 2


@pytest.fixture(scope="module")
def many_images(tmp_path_factory, astronaut, helpers):
    rows = []
    for i in range(NUM_ROWS):
        if i % 3 == 0:
            image = astronaut.resize((96 + 8 * (i % 4), 112))
            image = ImageOps.mirror(image) if i % 2 else image
            data = helpers.encode(image, "JPEG")
        elif i % 3 == 1:
            data = helpers.encode(np.roll(np.asarray(astronaut.resize((100, 100))), i * 7, axis=1))
        else:
            data = helpers.encode(helpers.flat(80, 64, value=10 * i))
        rows.append({"id": f"row-{i:02d}", "image": data, "source_caption": f"caption {i}" if i % 2 else None})
    rows[13]["image"] = b"not an image at all"
    return helpers.write_captioned(str(tmp_path_factory.mktemp("many") / "images"), rows, ROWS_PER_SHARD)


def committed(folder) -> dict[str, tuple[int, str]]:
    return {f"{t}/{p.name}": (p.stat().st_mtime_ns, p.read_text())
            for t in ("canny", "pose") if (folder / t / "_commits").exists()
            for p in (folder / t / "_commits").iterdir() if not p.name.startswith(".tmp-")}


def test_sigkilled_conditioning_resumes_to_the_uninterrupted_result(tmp_path, many_images, helpers):
    config = conditioning_config(types=["canny", "pose"])
    out = tmp_path / "resumed"
    argv = helpers.argv(config.to_json(), str(out), many_images.uri)
    kill_after_commits(argv, helpers.env(), [out / "canny", out / "pose"])
    assert not (out / "summary.json").exists() and not (out / "canny" / "manifest.json").exists()
    before = committed(out)
    assert 1 <= len(before) < 2 * NUM_ROWS // ROWS_PER_SHARD
    (out / "pose" / "data").mkdir(parents=True, exist_ok=True)
    (out / "pose" / "data" / ".tmp-0000dead-part-00011.parquet").write_bytes(b"half a shard")

    done = subprocess.run(argv, env=helpers.env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    # MediaPipe's per-graph notices (TFLite's XNNPACK line, absl's W0000 lines) are not in the stage's log
    assert "XNNPACK" not in done.stderr and "W0000" not in done.stderr and "InitializeLog" not in done.stderr, done.stderr
    after = committed(out)
    assert {k: after[k] for k in before} == before, "shards committed before the kill were redone"

    reference = tmp_path / "uninterrupted"
    expected_summary = run(config, {"images": many_images}, str(reference))
    resumed_summary = json.loads((out / "summary.json").read_text())
    for name in ("canny", "pose"):
        counts = {k: v for k, v in expected_summary["types"][name].items() if k != "uri"}
        assert {k: v for k, v in resumed_summary["types"][name].items() if k != "uri"} == counts
        resumed, expected = Manifest.load(str(out / name)), Manifest.load(str(reference / name))
        for field in ("config_hash", "schema", "shards", "rows_in", "rows_out", "rows_rejected", "rejections", "notes"):
            assert getattr(resumed, field) == getattr(expected, field), (name, field)
        assert resumed.rows_in == NUM_ROWS
        resumed_rows = pa.concat_tables([t for _, t in resumed.iter_shards()])
        expected_rows = pa.concat_tables([t for _, t in expected.iter_shards()])
        ids = resumed_rows.column("id").to_pylist()
        assert len(ids) == len(set(ids)) and ids == expected_rows.column("id").to_pylist()
        assert resumed_rows.column("control").to_pylist() == expected_rows.column("control").to_pylist()
        assert resumed_rows.equals(expected_rows)
        reasons = ["stage", "id", "reason"]
        assert resumed.rejected_table().select(reasons).equals(expected.rejected_table().select(reasons))
        assert not [p for p in storage.iter_files(str(out / name)) if p.rsplit("/", 1)[-1].startswith(".tmp-")]
    assert Manifest.load(str(out / "pose")).rejections["no_pose"] > 0
    assert Manifest.load(str(out / "canny")).rejections == {"not_an_image": 1}
