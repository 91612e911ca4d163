"""The fill domain: a synthetic dataset in the spirit of the ControlNet authors' fill50k, and a tiny SD-style base
pretrained on it, both made on this machine (nothing downloaded) and cached under `<assets>/fill/`.

Each image is a filled circle of one colour on a background of another; its prompt names both ("a red circle on a
blue background"); its control is the circle's outline, which the pipeline's own conditioning stage makes (Canny of
the image reproduces the outline: every colour pair below differs in gray level by at least MIN_GRAY_GAP).

<assets>/fill/seeds/  the hub-load folder: FOLDER_IMAGES PNGs with sidecar .txt prompts
<assets>/fill/tiny-sd-fill/  a diffusers StableDiffusionPipeline folder (safetensors): tiny_sd's architecture, with the
      VAE and the UNet trained here on this domain (`pretrain`), the CLIP text encoder left at its seeded random
      weights and frozen (as SD freezes its pretrained CLIP), the VAE's scaling_factor set so latents have unit std.
      samples.png beside it: prompts sampled with the pipeline itself, one row per prompt (look at it).

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
VERSION = "1"
VERSION_FILE = ".version"


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


def pretrain(folder: pathlib.Path, vae_steps: int = 400, unet_steps: int = 500, batch: int = 16, seed: int = 0,
             latent_pool: int = 1024) -> None:
    """tiny_sd's architecture trained on the fill domain: the VAE first (L1 + a small KL, as SD's autoencoder without
    its GAN term, on 32 px crops, decoding the posterior mean), then the UNet on its latents (epsilon objective, the scheduler's noise schedule, 10 % empty prompts
    so classifier-free guidance works). Seeded; CPU; writes a diffusers folder and samples.png into `folder`."""
    import torch
    import torch.nn.functional as F
    from diffusers import StableDiffusionPipeline

    from cnpipe.embedded import tiny_sd

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed + 100)
    tiny_sd.build(folder)
    pipe = StableDiffusionPipeline.from_pretrained(folder, use_safetensors=True, safety_checker=None, requires_safety_checker=False)
    vae, unet, text_encoder, tokenizer, scheduler = pipe.vae, pipe.unet, pipe.text_encoder, pipe.tokenizer, pipe.scheduler

    start = time.time()
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    for step in range(vae_steps):
        lr = 2e-3 * min(1.0, (step + 1) / 20) * (0.2 if step > 0.8 * vae_steps else 1.0)
        for group in opt.param_groups:
            group["lr"] = lr
        x, _ = _batch(rng, batch)
        top, left = (int(v) for v in rng.integers(0, SIZE // 2 + 1, 2))
        x = x[:, :, top:top + SIZE // 2, left:left + SIZE // 2]  # 32 px crops: the same flat colours and edges, 4x cheaper
        posterior = vae.encode(x).latent_dist
        # decoded from the posterior mean (what encode stores); the small KL keeps the latents' scale in hand
        recon = vae.decode(posterior.mode()).sample
        loss = F.l1_loss(recon, x) + 1e-6 * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % 25 == 0 or step == vae_steps - 1:
            _log(f"vae step {step} l1+kl {loss.item():.4f} ({time.time() - start:.0f} s)")
    vae.eval()

    with torch.no_grad():
        x, _ = _batch(np.random.default_rng(seed + 200), 256)
        std = float(vae.encode(x).latent_dist.mean.std())
    vae.register_to_config(scaling_factor=1.0 / std)
    _log(f"latent std {std:.3f}: scaling_factor {1.0 / std:.4f}")

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
    pool_latents = torch.cat(pool_latents)

    start = time.time()
    unet.train()
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-3, weight_decay=1e-2)
    alphas = scheduler.alphas_cumprod
    for step in range(unet_steps):
        lr = 1e-3 * min(1.0, (step + 1) / 50) * 0.5 * (1 + np.cos(np.pi * step / unet_steps))
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
        if step % 100 == 0 or step == unet_steps - 1:
            _log(f"unet step {step} loss {loss.item():.4f} ({time.time() - start:.0f} s)")
    unet.eval()
    pipe.save_pretrained(folder, safe_serialization=True)
    sample_grid(folder, folder / "samples.png")


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
