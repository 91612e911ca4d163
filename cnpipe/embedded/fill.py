"""The fill domain: a synthetic dataset in the spirit of the ControlNet authors' fill50k, and a tiny SD-style base
pretrained on it, both made on this machine (nothing downloaded) and cached under `<assets>/fill/`.

Each image is a filled circle of one colour on a background of another; its prompt names both ("a red circle on a
blue background"); its control is the circle's outline, which the pipeline's own conditioning stage makes (Canny of
the image reproduces the outline: every colour pair below differs in gray level by at least MIN_GRAY_GAP).

<assets>/fill/seeds/  the hub-load folder: FOLDER_IMAGES PNGs with sidecar .txt prompts
<assets>/fill/tiny-sd-fill/  a diffusers StableDiffusionPipeline folder (safetensors): tiny_sd's text encoder,
      tokenizer and scheduler, with a VAE and UNet of this module's own sizes (VAE and UNET below: a 4x VAE, i.e.
      16x16 latents, because an 8x8 latent of a tiny VAE could not hold a circle's edge) trained here on this domain
      (`pretrain`); the CLIP text encoder left at its seeded random weights and frozen (as SD freezes its pretrained
      CLIP), the VAE's scaling_factor set so latents have unit std. pretrain.json beside it: the measured
      reconstruction error, denoising loss and times. samples.png: prompts sampled with the pipeline itself, one row
      per prompt (look at it).

`python -m cnpipe.embedded.fill <assets>` makes whichever is missing (or made by an older VERSION); a few minutes
on two cores the first time, nothing after.
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import sys
import time

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64  # = tiny_sd.RESOLUTION
COLOURS = {
    "red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 60, 220), "yellow": (240, 220, 40),
    "white": (250, 250, 250), "black": (10, 10, 10), "orange": (245, 140, 20), "purple": (130, 40, 170),
    "cyan": (40, 210, 220), "gray": (128, 128, 128),
}
MIN_GRAY_GAP = 30  # pairs closer than this in gray level (ITU-R 601 luma) are left out: Canny would miss their edge
MIN_RADIUS, MAX_RADIUS = 7, 20
FOLDER_IMAGES = 640
FOLDER_SEED = 1234  # the pipeline's data; pretraining draws from other seeds (the same distribution, other circles)
VERSION = "2"
VERSION_FILE = ".version"


# The base's own sizes (tiny_sd's default base stays as the rest of the pipeline uses it). The VAE downsamples 4x
# (three levels), so the preset's conditioning_embedding_out_channels has three entries; UNet channels are multiples
# of 32 so the Flax UNet/ControlNet (GroupNorm with 32 groups) reproduce it.
VAE = dict(
    sample_size=SIZE, in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64, 64),
    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=1,
    norm_num_groups=16,
)
VAE_FACTOR = 2 ** (len(VAE["block_out_channels"]) - 1)
UNET = dict(
    sample_size=SIZE // VAE_FACTOR, in_channels=4, out_channels=4, block_out_channels=(32, 64, 64),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
    attention_head_dim=4, norm_num_groups=32,
)


def _luma(rgb) -> float:
    r, g, b = rgb
    return 0.299 * r + 0.587 * g + 0.114 * b


PAIRS = [(c, b) for c in COLOURS for b in COLOURS if c != b and abs(_luma(COLOURS[c]) - _luma(COLOURS[b])) >= MIN_GRAY_GAP]


def prompt(circle: str, background: str) -> str:
    return f"a {circle} circle on a {background} background"


def draw(circle: str, background: str, cx: float, cy: float, r: float, size: int = SIZE) -> Image.Image:
    """The circle drawn at 4× and downsampled: smooth edges, as a rendered photo has."""
    big = Image.new("RGB", (4 * size, 4 * size), COLOURS[background])
    ImageDraw.Draw(big).ellipse([4 * (cx - r), 4 * (cy - r), 4 * (cx + r), 4 * (cy + r)], fill=COLOURS[circle])
    return big.resize((size, size), Image.Resampling.BOX)


def sample(rng: np.random.Generator, size: int = SIZE) -> tuple[Image.Image, str, tuple[float, float, float]]:
    """A random image, its prompt and its circle (cx, cy, r) in pixels; the circle lies wholly inside the image."""
    circle, background = PAIRS[rng.integers(len(PAIRS))]
    r = float(rng.uniform(MIN_RADIUS, MAX_RADIUS)) * size / SIZE
    cx, cy = (float(v) for v in rng.uniform(r + 2, size - r - 2, 2))
    return draw(circle, background, cx, cy, r, size), prompt(circle, background), (cx, cy, r)


def make_folder(folder: pathlib.Path, count: int = FOLDER_IMAGES, seed: int = FOLDER_SEED) -> None:
    """The hub-load folder: fill_<i>.png with fill_<i>.txt, and circles.json (each image's circle, for benchmarks)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    circles = {}
    for i in range(count):
        image, text, circle = sample(rng)
        image.save(folder / f"fill_{i:05d}.png")
        (folder / f"fill_{i:05d}.txt").write_text(text)
        circles[f"fill_{i:05d}.png"] = {"prompt": text, "cx": circle[0], "cy": circle[1], "r": circle[2]}
    (folder / "circles.json").write_text(json.dumps(circles, indent=0))


def _batch(rng: np.random.Generator, n: int):
    import torch

    images, prompts = [], []
    for _ in range(n):
        image, text, _ = sample(rng)
        images.append(np.asarray(image, dtype=np.float32) / 127.5 - 1.0)
        prompts.append(text)
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), prompts


def _log(message: str) -> None:
    print(f"fill pretrain: {message}", file=sys.stderr, flush=True)


def _base(folder: pathlib.Path):
    """tiny_sd's folder (text encoder, tokenizer, scheduler) with this module's VAE and UNet, seeded."""
    import torch
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel

    from cnpipe.embedded import tiny_sd

    tiny_sd.build(folder)
    pipe = StableDiffusionPipeline.from_pretrained(folder, use_safetensors=True, safety_checker=None, requires_safety_checker=False)
    torch.manual_seed(tiny_sd.SEED + 11)
    unet = UNet2DConditionModel(cross_attention_dim=tiny_sd.TEXT_HIDDEN, **UNET)
    torch.manual_seed(tiny_sd.SEED + 12)
    vae = AutoencoderKL(**VAE)
    return StableDiffusionPipeline(vae=vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=unet,
                                   scheduler=pipe.scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def pretrain(folder: pathlib.Path, vae_steps: int = 1200, unet_steps: int = 2000, batch: int = 16, seed: int = 0,
             latent_pool: int = 2048, vae_lr: float = 2e-3, unet_lr: float = 1e-3, kl_weight: float = 1e-6,
             samples: bool = True) -> dict:
    """The VAE first (L1 + a small KL, as SD's autoencoder without its GAN term, on 32 px crops, decoding the
    posterior mean, which is what encode stores), then the UNet on its latents (epsilon objective, the scheduler's
    noise schedule, 10 % empty prompts so classifier-free guidance works). Seeded; CPU, 2 threads; writes a diffusers
    folder, pretrain.json (measured numbers) and, with `samples`, samples.png into `folder`; returns the numbers."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed + 100)
    pipe = _base(folder)
    vae, unet, text_encoder, tokenizer, scheduler = pipe.vae, pipe.unet, pipe.text_encoder, pipe.tokenizer, pipe.scheduler
    held_x, held_prompts = _batch(np.random.default_rng(seed + 200), 128)  # held-out images, full 64 px
    numbers: dict = {"vae_factor": VAE_FACTOR, "vae_steps": vae_steps, "unet_steps": unet_steps, "batch": batch,
                     "threads": torch.get_num_threads()}

    start = time.time()
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=vae_lr, weight_decay=0.0)
    for step in range(vae_steps):
        lr = vae_lr * min(1.0, (step + 1) / 20) * (0.55 + 0.45 * np.cos(np.pi * step / vae_steps))
        for group in opt.param_groups:
            group["lr"] = lr
        x, _ = _batch(rng, batch)
        top, left = (int(v) for v in rng.integers(0, SIZE // 2 + 1, 2))
        x = x[:, :, top:top + SIZE // 2, left:left + SIZE // 2]  # 32 px crops: the same flat colours and edges, 4x cheaper
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.mode()).sample
        loss = F.l1_loss(recon, x) + kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == vae_steps - 1:
            _log(f"vae step {step} l1+kl {loss.item():.4f} ({time.time() - start:.0f} s)")
    vae.eval()
    numbers["vae_seconds"] = round(time.time() - start, 1)

    with torch.no_grad():
        mean = vae.encode(held_x).latent_dist.mean
        numbers["vae_heldout_l1"] = round(float(F.l1_loss(vae.decode(mean).sample, held_x)), 4)  # on the [-1, 1] scale
        std = float(mean.std())
    vae.register_to_config(scaling_factor=1.0 / std)
    _log(f"vae held-out L1 {numbers['vae_heldout_l1']} (pixels in [-1, 1]); latent std {std:.3f}: scaling_factor {1.0 / std:.4f}")

    texts = [prompt(c, b) for c, b in PAIRS] + [""]
    with torch.no_grad():
        ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        encoded = text_encoder(ids)[0]
    by_text = {t: encoded[i] for i, t in enumerate(texts)}

    pool_latents, pool_prompts = [], []
    with torch.no_grad():  # a fixed pool of encoded images, so that a UNet step does not run the VAE
        for _ in range(latent_pool // 64):
            x, prompts = _batch(rng, 64)
            pool_latents.append(vae.encode(x).latent_dist.mean * vae.config.scaling_factor)
            pool_prompts += prompts
        held_latents = vae.encode(held_x).latent_dist.mean * vae.config.scaling_factor
    pool_latents = torch.cat(pool_latents)

    start = time.time()
    unet.train()
    opt = torch.optim.AdamW(unet.parameters(), lr=unet_lr, weight_decay=1e-2)
    alphas = scheduler.alphas_cumprod
    recent = []
    for step in range(unet_steps):
        lr = unet_lr * min(1.0, (step + 1) / 50) * 0.5 * (1 + np.cos(np.pi * step / unet_steps))
        for group in opt.param_groups:
            group["lr"] = max(lr, 2e-5)
        pick = rng.integers(len(pool_prompts), size=batch)
        latents = pool_latents[torch.from_numpy(pick)]
        prompts = ["" if rng.random() < 0.1 else pool_prompts[i] for i in pick]
        context = torch.stack([by_text[p] for p in prompts])
        noise = torch.randn_like(latents)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,))
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
        loss = F.mse_loss(unet(noisy, t, encoder_hidden_states=context).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        recent = (recent + [loss.item()])[-100:]
        if step % 100 == 0 or step == unet_steps - 1:
            _log(f"unet step {step} loss {loss.item():.4f} (mean of last 100: {np.mean(recent):.4f}) ({time.time() - start:.0f} s)")
    unet.eval()
    numbers["unet_seconds"] = round(time.time() - start, 1)
    numbers["unet_loss_last100"] = round(float(np.mean(recent)), 4)
    with torch.no_grad():  # held-out denoising loss at fixed noise and timesteps, with and without the prompt
        g = torch.Generator().manual_seed(seed + 300)
        noise = torch.randn(held_latents.shape, generator=g)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(held_latents),), generator=g)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * held_latents + (1 - a).sqrt() * noise
        for name, ctx in (("prompted", torch.stack([by_text[p] for p in held_prompts])),
                          ("empty", by_text[""].expand(len(held_prompts), -1, -1))):
            numbers[f"unet_heldout_loss_{name}"] = round(float(F.mse_loss(unet(noisy, t, encoder_hidden_states=ctx).sample, noise)), 4)
    _log(f"numbers {json.dumps(numbers)}")
    pipe.save_pretrained(folder, safe_serialization=True)
    (folder / "pretrain.json").write_text(json.dumps(numbers, indent=1))
    if samples:
        sample_grid(folder, folder / "samples.png")
    return numbers


def sample_grid(folder: pathlib.Path, out: pathlib.Path, per_prompt: int = 6, steps: int = 30, guidance: float = 3.0) -> None:
    """One row per prompt (6 prompts), `per_prompt` seeds each, drawn by the saved pipeline itself."""
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, use_safetensors=True, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    prompts = [prompt(c, b) for c, b in (("red", "blue"), ("yellow", "black"), ("white", "green"),
                                         ("blue", "yellow"), ("black", "orange"), ("purple", "cyan"))]
    canvas = Image.new("RGB", (per_prompt * SIZE, len(prompts) * SIZE))
    for row, text in enumerate(prompts):
        generators = [torch.Generator("cpu").manual_seed(i) for i in range(per_prompt)]
        images = pipe([text] * per_prompt, height=SIZE, width=SIZE, num_inference_steps=steps, guidance_scale=guidance,
                      generator=generators).images
        for col, image in enumerate(images):
            canvas.paste(image, (col * SIZE, row * SIZE))
    canvas.save(out)


def ensure(assets: str) -> dict:
    """<assets>/fill/{seeds, tiny-sd-fill}, each made when missing or of an older VERSION; returns their paths."""
    root = pathlib.Path(assets) / "fill"
    root.mkdir(parents=True, exist_ok=True)
    made = {}
    for name, make in (("seeds", make_folder), ("tiny-sd-fill", pretrain)):
        target = root / name
        made[name] = str(target)
        if (target / VERSION_FILE).exists() and (target / VERSION_FILE).read_text().strip() == VERSION:
            continue
        _log(f"making {target} (once; cached after)")
        tmp = root / f".tmp-{name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        make(tmp)
        (tmp / VERSION_FILE).write_text(VERSION)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    return made


if __name__ == "__main__":
    print(json.dumps(ensure(sys.argv[1])))
