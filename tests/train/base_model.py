"""The base model of the training tests: tiny-sd's recipe, narrower and at 32 px, so steps compile and run fast.

Built as cnpipe.embedded.tiny_sd builds the embedded base (the same diffusers classes, seeded random
weights, save_pretrained with safetensors, tiny-sd's VAE and noise schedule); only the UNet is
narrower (two blocks of 32 channels: the Flax GroupNorm needs multiples of 32) and the resolution is
32 px (latents 4x4 through the VAE's 8x). Only what training reads is written: unet/, vae/, scheduler/.
"""
from __future__ import annotations

import pathlib
import shutil

from cnpipe.embedded import tiny_sd

RESOLUTION = 32
TEXT_SHAPE = (77, tiny_sd.TEXT_HIDDEN)
CONDITIONING_CHANNELS = [8, 8, 16, 16]  # one stride-2 level per VAE downsampling, as the embedded preset
UNET = {**tiny_sd.UNET, "sample_size": RESOLUTION // 8, "block_out_channels": (32, 32), "attention_head_dim": 2}
VAE = {**tiny_sd.VAE, "sample_size": RESOLUTION}


def build(folder: pathlib.Path) -> None:
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    torch.manual_seed(tiny_sd.SEED + 1)
    UNet2DConditionModel(**UNET).eval().save_pretrained(folder / "unet", safe_serialization=True)
    torch.manual_seed(tiny_sd.SEED + 2)
    AutoencoderKL(**VAE).eval().save_pretrained(folder / "vae", safe_serialization=True)
    DDPMScheduler(**tiny_sd.SCHEDULER).save_pretrained(folder / "scheduler")


def ensure(models_dir: str) -> str:
    """`<models_dir>/test-base`, built when absent (half-built ones are rebuilt)."""
    target = pathlib.Path(models_dir) / "test-base"
    if (target / "scheduler" / "scheduler_config.json").exists():
        return str(target)
    tmp = target.with_name(".tmp-test-base")
    shutil.rmtree(tmp, ignore_errors=True)
    build(tmp)
    tmp.rename(target)
    return str(target)
