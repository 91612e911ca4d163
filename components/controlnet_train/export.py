"""Trained Flax ControlNet -> a PyTorch diffusers ControlNet folder (config.json + safetensors).

The PyTorch model is built the way diffusers builds one for training (`ControlNetModel.from_unet`
on the base's UNet), so its config carries every UNet setting; then each of its weights is
replaced by the trained Flax value (weights.flax_to_pytorch: strict, every key accounted for).
"""
from __future__ import annotations

import os
import tempfile

import numpy as np

from cnpipe import storage
from components.controlnet_train.weights import flax_to_pytorch


def build_pytorch_controlnet(base_folder: str, conditioning_channels: list[int]):
    from diffusers import ControlNetModel, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(base_folder, subfolder="unet", use_safetensors=True, low_cpu_mem_usage=False)
    return ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=tuple(conditioning_channels))


def export_controlnet(params, base_folder: str, conditioning_channels: list[int], output_uri: str) -> list[str]:
    """Writes the folder at `output_uri` (local or object store); returns the names of the files written."""
    import torch

    model = build_pytorch_controlnet(base_folder, conditioning_channels)
    shapes = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    state = flax_to_pytorch(params, shapes, f"ControlNet export to {output_uri}")
    model.load_state_dict({key: torch.from_numpy(np.array(value)) for key, value in state.items()}, strict=True)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        names = sorted(os.listdir(tmp))
        for name in names:
            with open(os.path.join(tmp, name), "rb") as f:
                storage.write_bytes_atomic(storage.join(output_uri, name), f.read())
    return names
