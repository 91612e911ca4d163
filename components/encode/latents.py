"""R×R RGB images → the latents the UNet denoises: AutoencoderKL posterior mean × scaling_factor.

The mean, not a sample: the SD VAE's posterior std is tiny next to the diffusion noise training
adds, so one frozen sample would be noise without augmentation value, and the mean makes encode
deterministic (a resumed or repeated run writes identical bytes).
"""
from __future__ import annotations

import numpy as np


class LatentEncoder:
    def __init__(self, base_model, device: str):
        import torch
        from diffusers import AutoencoderKL

        self.torch = torch
        self.device = device
        from cnpipe.torch_models import load_pretrained

        vae = load_pretrained(
            AutoencoderKL, base_model.path, subfolder="vae", revision=base_model.revision or None,
            torch_dtype=torch.float32,  # fp32 even on GPUs: SD VAEs can overflow in fp16
            low_cpu_mem_usage=False,  # the image carries no accelerate
        )
        self.vae = vae.to(device).eval()
        self.downsampling = 2 ** (len(vae.config.block_out_channels) - 1)
        self.scaling_factor = vae.config.scaling_factor
        self.shift_factor = getattr(vae.config, "shift_factor", None) or 0.0  # SD3/Flux VAEs; 0 for SD 1.x/2.x

    def __call__(self, images: list) -> np.ndarray:
        """float32 [batch, latent_channels, R/d, R/d] for same-size RGB PIL images."""
        pixels = np.stack([np.asarray(image, dtype=np.float32) for image in images]) / 127.5 - 1.0
        batch = self.torch.from_numpy(pixels).permute(0, 3, 1, 2).to(self.device)
        with self.torch.inference_mode():
            mean = self.vae.encode(batch).latent_dist.mean
        return ((mean - self.shift_factor) * self.scaling_factor).float().cpu().numpy()
