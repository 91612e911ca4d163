"""Images from held-out controls: PyTorch StableDiffusionControlNetPipeline with the exported ControlNet.

Prompts are encoded by encode's own TextEncoder and passed as prompt_embeds (the negative branch
is the empty prompt, as encode's uncond file), so generation is conditioned exactly as training was,
for the CLIP and the T5 text encoder alike. Each sample has its own generator seeded with
evaluate.seed + its index, on the CPU: the starting noise is the same whatever the batch size or device.
"""
from __future__ import annotations

import contextlib
import os
import tempfile

from cnpipe import storage

CONTROLNET_FOLDERS = {True: "controlnet", False: "controlnet_raw"}


@contextlib.contextmanager
def local_folder(uri: str):
    """diffusers loads from local folders: an object-store folder is copied to a temporary one for the load."""
    if "://" not in uri or uri.startswith("file://"):
        yield uri.removeprefix("file://")
        return
    with tempfile.TemporaryDirectory(prefix="controlnet-") as target:
        for url in storage.iter_files(uri):
            path = os.path.join(target, url[len(uri.rstrip("/")) + 1:])
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(storage.read_bytes(url))
        yield target


def controlnet_uri(trained_uri: str, use_ema: bool) -> str:
    uri = storage.join(trained_uri, CONTROLNET_FOLDERS[use_ema])
    if not storage.exists(storage.join(uri, "config.json")):
        present = storage.list_names(trained_uri)
        raise FileNotFoundError(
            f"no exported ControlNet at {uri} (evaluate.use_ema={use_ema}); the training output holds: {present or 'nothing'}"
        )
    return uri


def load_pipeline(base_model, controlnet_folder: str, device: str):
    import torch
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    dtype = torch.float16 if device == "cuda" else torch.float32
    from cnpipe.torch_models import load_pretrained

    controlnet = load_pretrained(
        ControlNetModel, controlnet_folder, torch_dtype=dtype, low_cpu_mem_usage=False  # no accelerate in the image
    )
    pipeline = load_pretrained(
        StableDiffusionControlNetPipeline, base_model.path,
        revision=base_model.revision or None,
        controlnet=controlnet,
        text_encoder=None,  # prompts arrive as prompt_embeds from encode's TextEncoder
        tokenizer=None,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
        torch_dtype=dtype,
        low_cpu_mem_usage=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device)


def generate(pipeline, text_encoder, samples: list, evaluate, resolution: int, batch_size: int) -> list:
    """One generated PIL image per sample, in order."""
    import torch

    uncond = text_encoder([""])
    generated = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        embeds = text_encoder([s.prompt for s in chunk])
        generators = [torch.Generator("cpu").manual_seed(evaluate.seed + start + i) for i in range(len(chunk))]
        output = pipeline(
            prompt_embeds=embeds,
            negative_prompt_embeds=uncond.expand(len(chunk), -1, -1),
            image=[s.control for s in chunk],
            height=resolution,
            width=resolution,
            num_inference_steps=evaluate.num_inference_steps,
            guidance_scale=evaluate.guidance_scale,
            controlnet_conditioning_scale=evaluate.controlnet_conditioning_scale,
            generator=generators,
            output_type="pil",
        )
        generated += output.images
    return generated
