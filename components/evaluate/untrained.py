"""The untrained ControlNet: what training started from, so every run says how much training helped.

diffusers' `ControlNetModel.from_unet` (as train_controlnet.py and our trainer initialise): the encoder copied from the
base UNet, every zero convolution (and the conditioning embedding's last conv) zero, so its residuals are exactly
zero and the pipeline draws what the base alone draws. Built with the trained ControlNet's own conditioning-embedding
channels, and sampled with the same controls, prompts and seeds as the trained one.
"""
from __future__ import annotations


def untrained_controlnet(base_model, trained):
    """A zero-initialised ControlNet of the same config as `trained` (a loaded ControlNetModel), from the base UNet."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    from cnpipe.torch_models import load_pretrained

    unet = load_pretrained(UNet2DConditionModel, base_model.path, subfolder="unet", revision=base_model.revision or None,
                           low_cpu_mem_usage=False)
    config = trained.config
    controlnet = ControlNetModel.from_unet(
        unet,
        controlnet_conditioning_channel_order=config.controlnet_conditioning_channel_order,
        conditioning_embedding_out_channels=tuple(config.conditioning_embedding_out_channels),
        conditioning_channels=config.conditioning_channels,
    )
    return controlnet.to(device=trained.device, dtype=trained.dtype).eval()


SAME_KEYS = ("canny_f1", "canny_fidelity", "clip_score", "pose_pck")


def merge(measured_trained: dict, measured_untrained: dict) -> None:
    """The untrained model's per-sample numbers beside the trained one's (`<key>_untrained`), in place."""
    for row, other in zip(measured_trained["per_sample"], measured_untrained["per_sample"]):
        for key in SAME_KEYS:
            if key in other:
                row[f"{key}_untrained"] = other[key]
