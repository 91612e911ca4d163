"""Tiny Stable-Diffusion-style base ("tiny-sd"): the embedded stand-in for stable-diffusion-v1-5.

Same diffusers layout and classes as the real checkpoint (unet/, vae/, text_encoder/, tokenizer/,
scheduler/, model_index.json; safetensors weights), random weights from small seeded configs, so
encode, training and evaluate run their real code paths on two CPU cores with no download.

Sizes are chosen to stay compatible with the Flax model classes too: their ResNet GroupNorm uses
32 groups, hence UNet channels that are multiples of 32.
"""
from __future__ import annotations

import pathlib
import shutil

RESOLUTION = 64  # pixels; the VAE has 3 downsamplings, so latents are 8x8
TEXT_HIDDEN = 32  # = UNet cross_attention_dim
MAX_TEXT_LENGTH = 77
SEED = 0

UNET = dict(
    sample_size=RESOLUTION // 8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=1,
    cross_attention_dim=TEXT_HIDDEN,
    attention_head_dim=4,  # as in SD 1.x configs this is really the number of heads
    norm_num_groups=32,
)

VAE = dict(
    sample_size=RESOLUTION,
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    block_out_channels=(16, 16, 32, 32),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=1,
    norm_num_groups=8,
)

# The scheduler of stable-diffusion-v1-5, unchanged: training uses its noise schedule.
SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
    clip_sample=False,
    steps_offset=1,
)


def build(folder: pathlib.Path) -> None:
    """Builds the whole pipeline folder with seeded random weights."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from cnpipe.embedded.tiny_models import _clip_tokenizer_files

    folder.mkdir(parents=True, exist_ok=True)
    vocab_dir = folder / ".vocab"
    vocab_dir.mkdir(exist_ok=True)
    _clip_tokenizer_files(vocab_dir)
    tokenizer = CLIPTokenizer(
        str(vocab_dir / "vocab.json"), str(vocab_dir / "merges.txt"), model_max_length=MAX_TEXT_LENGTH
    )
    torch.manual_seed(SEED)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=TEXT_HIDDEN, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=MAX_TEXT_LENGTH,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    ).eval()
    torch.manual_seed(SEED + 1)
    unet = UNet2DConditionModel(**UNET).eval()
    torch.manual_seed(SEED + 2)
    vae = AutoencoderKL(**VAE).eval()
    pipeline = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=DDPMScheduler(**SCHEDULER), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(folder, safe_serialization=True)
    shutil.rmtree(vocab_dir)


def ensure(models_dir: str) -> str:
    """Returns `<models_dir>/tiny-sd`, building it first when absent (a half-built one is rebuilt)."""
    root = pathlib.Path(models_dir)
    target = root / "tiny-sd"
    if (target / "model_index.json").exists():
        return str(target)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / ".tmp-tiny-sd"
    shutil.rmtree(tmp, ignore_errors=True)
    build(tmp)
    tmp.rename(target)
    return str(target)


if __name__ == "__main__":
    import sys

    print(ensure(sys.argv[1]))
