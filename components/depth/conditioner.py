"""Depth maps from a transformers depth-estimation model (Depth Anything V2 by default, DPT/MiDaS work
too), normalised per image to 0..255 with near = bright, as ControlNet's depth models expect.

Follows components/conditioning/contract.py; registered in components/registry.py with the vision
family, whose environment has torch. Weights load from safetensors only.
"""
from __future__ import annotations

import numpy as np

from components.conditioning.contract import NoControl


class DepthConditioner:
    name = "depth"
    max_parallel = 1  # torch already spreads one call over every core; more calls at once only contend

    def __init__(self, config) -> None:
        import torch
        from transformers import AutoImageProcessor, AutoModelForDepthEstimation

        from cnpipe.torch_models import load_pretrained, pick_device

        self.torch = torch
        self.device = pick_device(config.depth_device)
        self.model = load_pretrained(AutoModelForDepthEstimation, config.depth_model).to(self.device).eval()
        self.processor = AutoImageProcessor.from_pretrained(config.depth_model)

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        height, width = rgb.shape[:2]
        with self.torch.inference_mode():
            pixels = self.processor(images=rgb, return_tensors="pt")["pixel_values"].to(self.device)
            depth = self.model(pixel_values=pixels).predicted_depth[:, None]
            depth = self.torch.nn.functional.interpolate(depth, size=(height, width), mode="bicubic", align_corners=False)[0, 0]
        depth = depth.float().cpu().numpy()
        if not np.isfinite(depth).all():
            raise NoControl("depth_not_finite", "the model returned NaN or inf")
        low, high = float(depth.min()), float(depth.max())
        if high - low < 1e-6:
            raise NoControl("flat_depth", "the estimated depth has no range")
        return np.round(255 * (depth - low) / (high - low)).astype(np.uint8)  # one channel; read back as RGB
