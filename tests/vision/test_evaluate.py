"""Evaluate stage, before training exists: a ControlNet made from the tiny base UNet stands in for the export.

`ControlNetModel.from_unet(...).save_pretrained(<train output>/controlnet)` is exactly the format
the train stage exports, so the stage runs its real code path.
"""
import dataclasses
import json
import math
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import model_half_data as data
from cnpipe import splits
from cnpipe.dataset import Manifest
from components.encode.pixels import square_crop
from components.evaluate import fidelity
from components.evaluate.frechet import frechet_distance
from components.evaluate.stage import run

REPO = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return data.assets(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def conditioning(tmp_path_factory):
    return Manifest.load(data.conditioning(tmp_path_factory.getbasetemp()))


@pytest.fixture(scope="module")
def trained(assets, tmp_path_factory):
    from diffusers import ControlNetModel, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(assets / "models" / "tiny-sd", subfolder="unet", use_safetensors=True)
    channels = tuple(data.config(assets).train.conditioning_embedding_out_channels)
    folder = tmp_path_factory.mktemp("train-output")
    ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=channels).save_pretrained(
        folder / "controlnet", safe_serialization=True
    )
    (folder / "summary.json").write_text('{"controlnet": "controlnet"}')  # what a finished train stage leaves
    return folder


def test_cli_writes_grid_report_and_metrics(assets, conditioning, trained, tmp_path):
    cfg = data.config(assets)
    out = tmp_path / "evaluate"
    result = subprocess.run(
        [sys.executable, "-m", "components.evaluate", "--config-json", cfg.to_json(), "--input", f"trained={trained}",
         "--input", f"conditioning={conditioning.uri}", "--output", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    printed = json.loads(result.stdout.strip().splitlines()[-1])
    metrics = json.loads((out / "metrics.json").read_text())
    assert printed["stage"] == "evaluate" and printed["metrics"] == metrics["metrics"]

    heldout = [f"row-{i}" for i in range(data.NUM_ROWS) if splits.is_heldout(f"row-{i}", 0.4) and f"row-{i}" != data.CORRUPT_ID]
    expected_ids = heldout[: cfg.evaluate.num_samples]
    assert [s["id"] for s in metrics["per_sample"]] == expected_ids and metrics["heldout_fallback"] is False
    with Image.open(out / "grid.png") as grid:
        assert grid.size == (4 * 64, len(expected_ids) * 64)  # control | untrained | trained | reference
        tiles = np.asarray(grid.convert("RGB"), dtype=np.int16)
    # the fixture's "trained" ControlNet is itself fresh from the base UNet (zero convolutions), so the untrained
    # column, sampled with the same controls, prompts and seeds, is the same picture and scores the same
    assert np.abs(tiles[:, 64:128] - tiles[:, 128:192]).max() <= 2
    assert set(metrics["metrics_untrained"]) == set(metrics["metrics"])
    for name, value in metrics["metrics"].items():
        assert metrics["metrics_untrained"][name] == pytest.approx(value, abs=1e-3), name
    assert all("canny_f1_untrained" in s and "canny_fidelity_untrained" in s for s in metrics["per_sample"])
    with Image.open(out / "fidelity.png") as bars:
        assert bars.size[0] > 100 and len(set(bars.convert("RGB").getdata())) > 3
    for name in ("clip_score", "clip_score_reference", "canny_f1", "canny_precision", "canny_recall"):
        assert math.isfinite(metrics["metrics"][name]), name
    for name in ("canny_f1", "canny_precision", "canny_recall", "canny_f1_reference", "canny_f1_noise", "canny_f1_all_edges"):
        assert 0.0 <= metrics["metrics"][name] <= 1.0
    # the floor and the ceiling on the same controls (the fixture's controls are gray canny of the 96x72 images)
    assert metrics["metrics"]["canny_f1_noise"] < 0.25 and metrics["metrics"]["canny_f1_all_edges"] < 0.15
    assert metrics["metrics"]["canny_f1_reference"] > 0.6
    # an untrained (random) ControlNet on a random base: no better than chance once rescaled
    assert 0.0 <= metrics["metrics"]["canny_fidelity"] <= 1.0
    assert all(s["canny_fidelity"] is None or 0.0 <= s["canny_fidelity"] <= 1.0 for s in metrics["per_sample"])
    assert set(metrics["fidelity_yardsticks"]) == {"generated", "reference", "noise", "all_edges"}
    assert metrics["fidelity_yardsticks"]["generated"]["f1"] == metrics["metrics"]["canny_f1"]
    assert "fd_clip" not in metrics["metrics"]
    assert "fid_min_images=50" in metrics["not_computed"]["fd_clip"]

    report = (out / "report.md").read_text()
    assert "](grid.png)" in report
    assert "| metric | untrained ControlNet | trained ControlNet |" in report and "](fidelity.png)" in report
    noise_f1 = f"{metrics['fidelity_yardsticks']['noise']['f1']:.4g} |"
    assert "| uniform noise images (the floor) |" in report and noise_f1 in report
    assert "| reference images (the ceiling) |" in report and "| every pixel an edge (the floor) |" in report
    for name in [*metrics["metrics"], "fd_clip", "fid_min_images=50"]:
        assert name in report
    for sample in metrics["per_sample"]:
        assert sample["id"] in report and sample["prompt"] in report
    if data.NO_CAPTION_ID in expected_ids:  # an empty prompt has no CLIP score rather than a made-up one
        assert next(s for s in metrics["per_sample"] if s["id"] == data.NO_CAPTION_ID)["clip_score"] is None


def test_first_rows_when_nothing_is_held_out_pose_unavailable_and_fd_when_enough_pairs(assets, conditioning, trained, tmp_path):
    pose_uri = tmp_path / "conditioning" / "pose"  # same rows, filed as the pose controls
    shutil.copytree(conditioning.uri, pose_uri)
    cfg = data.config(assets, holdout_fraction=0.0, conditioning_type="pose")
    cfg.evaluate.fid_min_images = 2
    cfg.evaluate.batch_size = 3
    summary = run(cfg, {"trained": str(trained), "conditioning": Manifest.load(str(pose_uri))}, str(tmp_path / "out"))
    assert summary["heldout_fallback"] is True and "FIRST rows" in summary["selection"]
    assert sum(summary["skipped_rows"].values()) == 1  # the corrupt row, counted with its reason
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert [s["id"] for s in metrics["per_sample"]] == ["row-0", "row-1", "row-3", "row-4"]
    assert summary["not_computed"]["pose_fidelity"].startswith("unavailable in this environment")
    assert math.isfinite(summary["metrics"]["fd_clip"]) and summary["metrics"]["fd_clip"] >= 0
    assert "FIRST rows" in (tmp_path / "out" / "report.md").read_text()


def test_missing_export_is_a_clear_error_before_generating(assets, conditioning, trained, tmp_path):
    cfg = data.config(assets)
    cfg.evaluate.use_ema = False
    with pytest.raises(FileNotFoundError, match="controlnet_raw.*controlnet"):
        run(cfg, {"trained": str(trained), "conditioning": conditioning}, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((400, 5)) @ rng.standard_normal((5, 5)) + 3.0
    shift = np.array([1.0, -2.0, 0.5, 0.0, 2.0])
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    assert frechet_distance(a, a + shift) == pytest.approx(float(shift @ shift), rel=1e-9)
    # b = 2a: |mu|² + tr(S) + 4 tr(S) - 2 tr((4 S²)^½) = |mu|² + tr(S)
    expected = float(a.mean(0) @ a.mean(0) + np.trace(np.cov(a, rowvar=False)))
    assert frechet_distance(a, 2 * a) == pytest.approx(expected, rel=1e-8)
    with pytest.raises(ValueError):
        frechet_distance(a[:1], a)


def test_edge_f1_with_tolerance():
    target = np.zeros((32, 32), bool)
    target[10, 5:25] = True
    near, far = np.roll(target, 1, axis=0), np.roll(target, 3, axis=0)
    assert fidelity.edge_f1(target, target, 1)["f1"] == 1.0
    assert fidelity.edge_f1(near, target, 1)["f1"] == 1.0
    assert fidelity.edge_f1(far, target, 1)["f1"] == 0.0
    assert fidelity.edge_f1(far, target, 3)["f1"] == 1.0
    empty = np.zeros_like(target)
    assert fidelity.edge_f1(empty, empty, 1)["f1"] == 1.0
    assert fidelity.edge_f1(empty, target, 1) == {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    half = target.copy()
    half[10, 15:25] = False  # 10 of 20 found; column 14 is within 1 px of 15 too, but one to one it pairs once
    assert fidelity.edge_f1(half, target, 1) == pytest.approx({"precision": 1.0, "recall": 0.5, "f1": 2 / 3})
    assert fidelity.edge_tolerance(64) == 1 and fidelity.edge_tolerance(512) == 5


def test_edges_are_matched_one_to_one():
    """Three parallel lines around one control line: each is within tolerance, but only one can pair with it."""
    target = np.zeros((32, 32), bool)
    target[10, 5:25] = True
    triple = target | np.roll(target, 1, axis=0) | np.roll(target, -1, axis=0)
    assert fidelity.edge_f1(triple, target, 1) == pytest.approx({"precision": 1 / 3, "recall": 1.0, "f1": 0.5})
    assert fidelity.edge_f1(target, triple, 1) == pytest.approx({"precision": 1.0, "recall": 1 / 3, "f1": 0.5})
    everything = np.ones_like(target)
    assert fidelity.edge_f1(everything, target, 1)["precision"] == pytest.approx(20 / 1024)


def test_matching_is_maximum_as_networkx_hopcroft_karp():
    import networkx as nx

    rng = np.random.default_rng(0)
    for _ in range(20):
        size, tolerance = int(rng.integers(6, 24)), float(rng.choice([1, 2, 3]))
        a, b = rng.random((size, size)) < rng.uniform(0.05, 0.6), rng.random((size, size)) < rng.uniform(0.05, 0.6)
        graph = nx.Graph()
        left = [("a", p) for p in zip(*np.nonzero(a))]
        graph.add_nodes_from(left)
        graph.add_nodes_from(("b", q) for q in zip(*np.nonzero(b)))
        graph.add_edges_from((("a", p), ("b", q)) for _, p in left for q in zip(*np.nonzero(b))
                             if (p[0] - q[0]) ** 2 + (p[1] - q[1]) ** 2 <= tolerance ** 2)
        expected = len(nx.bipartite.hopcroft_karp_matching(graph, top_nodes=left)) // 2
        assert fidelity.matched_edges(a, b, tolerance) == expected


def test_thinning_is_scikit_image_thin():
    square = np.zeros((7, 7), bool)  # the example of skimage.morphology.thin's docstring, and its result
    square[1:-1, 2:-2] = True
    square[0, 1] = True
    expected = np.zeros((7, 7), bool)
    expected[0, 1] = expected[1, 2] = True
    expected[2:5, 3] = True
    np.testing.assert_array_equal(fidelity.thin(square), expected)


def test_control_edges_are_the_thinned_control_the_model_saw():
    control = np.zeros((256, 256, 3), np.uint8)
    control[100, :, :] = 255  # a one-pixel line, shrunk 4x as encode shrinks controls: a faint band, thinned back
    seen = square_crop(Image.fromarray(control), 64, Image.Resampling.BILINEAR)
    assert (np.asarray(seen)[:, 0, 0] > 0).sum() > 1
    edges = fidelity.control_edges(seen)
    assert edges.shape == (64, 64) and edges.any(axis=1).sum() == 1 and edges.sum() >= 62  # one line (its ends may thin)
    thick = np.zeros((64, 64, 3), np.uint8)
    thick[30:35, 10:50] = 255  # a five-pixel stroke counts as one line
    assert fidelity.control_edges(Image.fromarray(thick)).any(axis=0).sum() >= 36
    assert fidelity.control_edges(Image.fromarray(thick)).sum() <= 42


@pytest.mark.parametrize("resolution", [128, 256])
def test_noise_and_all_edges_score_near_zero_and_the_reference_at_its_ceiling(resolution):
    """Controls as the conditioning stage makes them from the reference (canny at the image's size): the reference
    scores 1, while noise and an all-edges map, which the old many-to-one metric put near 0.65, score near 0."""
    from components.conditioning.canny import CannyConditioner

    canny = CannyConditioner(dataclasses.replace(data.config(pathlib.Path("/unused")).conditioning, detect_resolution=0))
    scores = {"reference": [], "noise": [], "all_edges": []}
    for i in range(6):
        reference = data._scene(i, (resolution, resolution))
        control = Image.fromarray(canny(np.asarray(reference))).convert("RGB")
        scores["reference"].append(fidelity.canny_fidelity(reference, control, 100, 200)["f1"])
        scores["noise"].append(fidelity.canny_fidelity(fidelity.noise_image(resolution, i), control, 100, 200)["f1"])
        scores["all_edges"].append(fidelity.all_edges_fidelity(control)["f1"])
    means = {name: float(np.mean(values)) for name, values in scores.items()}
    assert means["reference"] == 1.0, means
    assert means["noise"] < 0.15 and means["all_edges"] < 0.06, means


def test_pck():
    reference = np.array([[10.0, 10.0, 0.9], [50.0, 50.0, 0.9], [30.0, 30.0, 0.1]])
    assert fidelity.pck(reference.copy(), reference) == 1.0
    moved = reference.copy()
    moved[1, :2] += 10  # 10 px off; threshold 0.1 × 40 = 4 px
    assert fidelity.pck(moved, reference) == 0.5
    assert fidelity.pck(None, reference) == 0.0
    invisible = reference.copy()
    invisible[:, 2] = 0.0
    assert fidelity.pck(reference, invisible) is None


def test_above_chance_puts_noise_at_zero_and_the_reference_at_one_even_on_dense_controls():
    """On a dense control (a textured photo) one-to-one matching still gives uniform noise a raw F1 well above 0;
    canny_fidelity rescales it so that noise and an all-edges map score 0 and the reference 1."""
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
    reference = Image.fromarray(blocks).resize((128, 128), Image.Resampling.NEAREST)  # dense edges everywhere
    control = Image.fromarray(fidelity.canny_edges(reference, 100, 200).astype(np.uint8) * 255).convert("RGB")
    raw = {"reference": fidelity.canny_fidelity(reference, control, 100, 200)["f1"],
           "noise": fidelity.canny_fidelity(fidelity.noise_image(128, 1), control, 100, 200)["f1"],
           "all_edges": fidelity.all_edges_fidelity(control)["f1"]}
    assert raw["noise"] > 0.2, raw  # what the raw score cannot tell apart from a model
    floor = max(raw["noise"], raw["all_edges"])
    assert fidelity.above_chance(raw["noise"], floor, raw["reference"]) == 0.0
    assert fidelity.above_chance(raw["all_edges"], floor, raw["reference"]) == 0.0
    assert fidelity.above_chance(raw["reference"], floor, raw["reference"]) == 1.0
    halfway = (floor + raw["reference"]) / 2
    assert fidelity.above_chance(halfway, floor, raw["reference"]) == pytest.approx(0.5)
    assert fidelity.above_chance(0.5, 0.5, 0.5) is None  # a control that tells nothing cannot be scored
