"""The fill domain (cnpipe/embedded/fill.py) and the "how much training helped" plots, at unit level: the pretraining
itself takes minutes and is exercised by `python pipeline.py run --preset embedded-fill`, not here."""
import io
import json
import math

import numpy as np
import pytest
from PIL import Image

from cnpipe.embedded import fill
from components.conditioning.canny import CannyConditioner
from components.report import plots


def _circle_of(image: Image.Image) -> tuple[float, float, float]:
    """(cx, cy, r) fitted to the pixels that differ from the corner colour: centroid and area."""
    pixels = np.asarray(image, dtype=np.int16)
    inside = np.abs(pixels - pixels[0, 0]).sum(axis=2) > 60
    ys, xs = np.nonzero(inside)
    return float(xs.mean()) + 0.5, float(ys.mean()) + 0.5, math.sqrt(inside.sum() / math.pi)


def test_prompts_name_both_colours_and_every_pair_has_a_visible_edge():
    assert len(fill.PAIRS) >= 40
    for circle, background in fill.PAIRS:
        assert circle != background
        assert abs(fill._luma(fill.COLOURS[circle]) - fill._luma(fill.COLOURS[background])) >= fill.MIN_GRAY_GAP
        assert fill.prompt(circle, background) == f"a {circle} circle on a {background} background"


def test_circles_lie_inside_the_image_where_their_record_says():
    rng = np.random.default_rng(0)
    for _ in range(50):
        image, text, (cx, cy, r) = fill.sample(rng)
        assert image.size == (fill.SIZE, fill.SIZE) and text.startswith("a ")
        assert fill.MIN_RADIUS <= r <= fill.MAX_RADIUS and r < cx < fill.SIZE - r and r < cy < fill.SIZE - r
        fx, fy, fr = _circle_of(image)
        assert abs(fx - cx) < 0.75 and abs(fy - cy) < 0.75 and abs(fr - r) < 0.75


@pytest.mark.parametrize("seed", range(8))
def test_canny_of_the_image_is_the_circles_outline(seed):
    """The control the pipeline makes (its own canny conditioner at the preset's settings) traces the circle: every
    edge pixel within 1.5 px of the true circle, and the outline covered all the way round."""
    import pipeline_configs

    config = pipeline_configs.preset("embedded-fill").conditioning
    image, _, (cx, cy, r) = fill.sample(np.random.default_rng(seed))
    edges = CannyConditioner(config)(np.asarray(image))
    ys, xs = np.nonzero(edges)
    distance = np.abs(np.hypot(xs + 0.5 - cx, ys + 0.5 - cy) - r)
    assert len(xs) > 0 and distance.max() <= 1.5
    angles = np.arctan2(ys + 0.5 - cy, xs + 0.5 - cx)
    covered = np.unique(((angles + math.pi) / (2 * math.pi) * 36).astype(int) % 36)
    assert len(covered) >= 34  # of 36 ten-degree sectors


def test_folder_has_prompts_and_circle_records(tmp_path):
    fill.make_folder(tmp_path, count=5, seed=3)
    circles = json.loads((tmp_path / "circles.json").read_text())
    assert sorted(circles) == [f"fill_{i:05d}.png" for i in range(5)]
    for name, record in circles.items():
        assert (tmp_path / name.replace(".png", ".txt")).read_text() == record["prompt"]
        with Image.open(tmp_path / name) as image:
            fx, fy, fr = _circle_of(image.convert("RGB"))
        assert abs(fx - record["cx"]) < 0.75 and abs(fr - record["r"]) < 0.75


def test_preset_wires_the_generated_folder_and_base():
    import pipeline_configs

    config = pipeline_configs.preset("embedded-fill")
    assert config.hub_load.source.endswith("/fill/seeds") and config.base_model.path.endswith("/fill/tiny-sd-fill")
    assert config.retrieval.prompts == [] and not config.retrieval.use_image_seeds
    assert config.encode.conditioning_type == "canny" and config.encode.resolution == fill.SIZE


def test_fill_base_sizes_agree_with_the_preset_and_flax():
    """The fill VAE downsamples 4x (16x16 latents); the preset's ControlNet conditioning embedding must downsample as
    much (controlnet_train's check), and UNet channels must be multiples of 32 (the Flax GroupNorm)."""
    import pipeline_configs

    config = pipeline_configs.preset("embedded-fill")
    assert 2 ** (len(config.train.conditioning_embedding_out_channels) - 1) == fill.VAE_FACTOR == 4
    assert fill.UNET["sample_size"] * fill.VAE_FACTOR == config.encode.resolution == fill.SIZE
    assert all(c % 32 == 0 for c in fill.UNET["block_out_channels"])


def test_pretrain_writes_a_diffusers_folder_and_its_numbers(tmp_path):
    """A few steps only (the real pretraining takes minutes): the folder loads as a pipeline with the 4x VAE, and
    pretrain.json holds the measured reconstruction error and denoising losses."""
    from diffusers import StableDiffusionPipeline

    numbers = fill.pretrain(tmp_path, vae_steps=2, unet_steps=2, batch=4, latent_pool=64, samples=False)
    saved = json.loads((tmp_path / "pretrain.json").read_text())
    assert saved == numbers and saved["vae_factor"] == 4
    for key in ("vae_heldout_l1", "unet_loss_last100", "unet_heldout_loss_prompted", "unet_heldout_loss_empty"):
        assert math.isfinite(saved[key]) and saved[key] > 0
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path, use_safetensors=True, safety_checker=None, requires_safety_checker=False)
    assert pipe.vae_scale_factor == 4 and pipe.unet.config.sample_size == 16


def _png_size(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as image:
        return image.size


def test_loss_curve_plots_the_loss_going_down():
    records = [{"step": s, "loss": 1.0 / (1 + s / 10), "lr": 1e-3} for s in range(0, 200, 10)] + [{"event": "export"}]
    png = plots.loss_curve(records)
    assert _png_size(png) == (plots.WIDTH, plots.HEIGHT)
    image = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    blue = np.all(image == plots.COLOURS[0], axis=2)
    ys, xs = np.nonzero(blue[:, plots.MARGIN_L:plots.WIDTH - 200])
    left, right = ys[xs < xs.min() + 10].mean(), ys[xs > xs.max() - 10].mean()
    assert left < right  # the first steps' loss is drawn higher (smaller y) than the last ones'
    assert plots.loss_curve([{"event": "start"}]) is None


def test_fidelity_bars_untrained_beside_trained():
    summary = {"metrics": {"canny_f1": 0.6, "canny_fidelity": 0.5, "canny_f1_reference": 0.9, "canny_f1_noise": 0.2},
               "metrics_untrained": {"canny_f1": 0.1, "canny_fidelity": 0.0}}
    png = plots.fidelity_bars(summary)
    image = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    heights = [np.all(image == c, axis=2).any(axis=1).sum() for c in plots.COLOURS[:2]]
    assert heights[1] > heights[0] > 0  # the trained bars stand taller than the untrained ones
    assert plots.fidelity_bars({"metrics": {}}) is None


def test_report_section_links_the_plots_and_the_untrained_column(tmp_path):
    from cnpipe.dataset import StageOutput
    from components.report import training

    train, evaluated, out = tmp_path / "train", tmp_path / "evaluate", tmp_path / "report"
    train.mkdir(), evaluated.mkdir(), out.mkdir()
    (train / "metrics.jsonl").write_text("\n".join(json.dumps({"step": s, "loss": 0.5 - s / 1000}) for s in range(10, 110, 10)))
    grid = io.BytesIO()
    Image.new("RGB", (4 * 64, 2 * 64), (10, 200, 30)).save(grid, format="PNG")
    (evaluated / "grid.png").write_bytes(grid.getvalue())
    summary = {"metrics": {"canny_f1": 0.55, "canny_fidelity": 0.4}, "metrics_untrained": {"canny_f1": 0.12, "canny_fidelity": 0.0}}
    lines = training.section({"controlnet_train": StageOutput(str(train), {}), "evaluate": StageOutput(str(evaluated), summary)}, str(out))
    text = "\n".join(lines)
    assert f"]({training.LOSS_PNG})" in text and f"]({training.FIDELITY_PNG})" in text and f"]({training.GRID_PNG})" in text
    assert "first 0.49, last 0.4," in text
    assert "| canny_f1 | 0.12 | 0.55 |" in text and "| canny_fidelity | 0 | 0.4 |" in text
    for name in (training.LOSS_PNG, training.FIDELITY_PNG, training.GRID_PNG):
        assert (out / name).stat().st_size > 100
    assert training.section({}, str(out)) == []
