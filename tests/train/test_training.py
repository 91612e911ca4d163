"""Training really learns, and what it exports is the model it trained.

One in-process run overfits a single fixed batch (4 training rows = one global batch) with a high
learning rate; its outputs serve the export-parity and validation checks.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from base_model import RESOLUTION, TEXT_SHAPE
from runs import IN_PROCESS_STEP, logged_losses, make_config
from synthetic import write_encoded

STEPS, LOG_EVERY = 120, 10


@pytest.fixture(scope="module")
def overfit_run(base, tmp_path_factory):
    from components.controlnet_train.stage import run

    root = tmp_path_factory.mktemp("overfit")
    encoded = write_encoded(str(root / "encoded"), rows=6, heldout_rows=2)
    config = make_config(base, max_steps=STEPS, log_every=LOG_EVERY, checkpoint_every=STEPS, validation_rows=2,
                         validation_inference_steps=2, **IN_PROCESS_STEP)
    summary = run(config, {"encoded": encoded}, str(root / "train"))
    return root / "train", summary, config


def test_overfits_one_fixed_batch(overfit_run):
    output, summary, _ = overfit_run
    losses = logged_losses(output)
    assert len(losses) == STEPS // LOG_EVERY and all(np.isfinite(losses))
    # untrained, the loss stays near 1 (the noise's variance); trained, it is about half of that by now
    assert np.mean(losses[-3:]) < 0.7 * losses[0], losses
    assert summary["train_rows"] == 4 and summary["steps"] == STEPS
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "grad_norm", "lr", "step_time_s", "images_per_s"} <= set(records[-1])
    assert records[-1]["lr"] == pytest.approx(1e-2)


def test_validation_images_written(overfit_run):
    from PIL import Image

    output, summary, _ = overfit_run
    folder = output / "validation" / f"step_{STEPS:06d}"
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["row-0000.png", "row-0001.png"] == sorted(summary["validation"]["images"])
    strip = Image.open(folder / names[0])
    assert strip.size == (3 * RESOLUTION, RESOLUTION)  # control | generated | reference
    generated = np.asarray(strip)[:, RESOLUTION : 2 * RESOLUTION].astype(float)
    assert generated.std() > 1.0  # a real decode, not a blank image


def _flax_controlnet(config_json: dict):
    """The Flax ControlNet's residuals as NCHW numpy, one compiled program for every set of params."""
    import jax
    import jax.numpy as jnp

    from components.controlnet_train import model

    controlnet = model.make_controlnet(config_json, jnp.float32)
    apply = jax.jit(lambda params, *inputs: controlnet.apply({"params": params}, *inputs, return_dict=False))

    def output(params, inputs):
        down, mid = apply(params, *inputs)
        # diffusers' Flax ControlNet hands its residuals to the Flax UNet channels-last; PyTorch's are NCHW.
        return [np.asarray(d).transpose(0, 3, 1, 2) for d in down], np.asarray(mid).transpose(0, 3, 1, 2)

    return output


def test_pytorch_export_matches_flax(overfit_run, base):
    import orbax.checkpoint as ocp
    import torch
    from diffusers import ControlNetModel

    from components.controlnet_train import model

    output, _, config = overfit_run
    manager = ocp.CheckpointManager(str(output / "checkpoints"), item_names=("state", "meta"))
    state = manager.restore(STEPS, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    unet_config = model.read_config(base, "unet")
    cn_config = model.controlnet_config(unet_config, config.train.conditioning_embedding_out_channels)
    rng = np.random.default_rng(0)
    inputs = (
        rng.standard_normal((2, 4, RESOLUTION // 8, RESOLUTION // 8)).astype(np.float32),
        np.array([10, 800], np.int32),
        rng.standard_normal((2, *TEXT_SHAPE)).astype(np.float32),
        rng.random((2, 3, RESOLUTION, RESOLUTION)).astype(np.float32),
    )
    flax_controlnet = _flax_controlnet(cn_config)
    for folder, params in (("controlnet_raw", state["params"]), ("controlnet", state["ema_params"])):
        flax_down, flax_mid = flax_controlnet(params, inputs)
        assert np.abs(flax_mid).max() > 1e-2  # trained zero-convolutions: the comparison can fail
        pt = ControlNetModel.from_pretrained(str(output / folder), use_safetensors=True).eval()
        with torch.no_grad():
            out = pt(torch.from_numpy(inputs[0]), torch.from_numpy(inputs[1]).long(), torch.from_numpy(inputs[2]),
                     torch.from_numpy(inputs[3]), return_dict=False)
        assert len(out[0]) == len(flax_down)
        for a, b in zip(out[0], flax_down):
            np.testing.assert_allclose(a.numpy(), b, rtol=1e-3, atol=1e-3)  # activations reach ~15 here
        np.testing.assert_allclose(out[1].numpy(), flax_mid, rtol=1e-3, atol=1e-3)
    raw = (output / "controlnet_raw" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert raw != (output / "controlnet" / "diffusion_pytorch_model.safetensors").read_bytes()  # EMA differs
