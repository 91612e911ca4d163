"""Loading PyTorch models the same way in every torch stage: safetensors only (unless the config's
allow_pickle_weights says otherwise), chosen device, eval mode.

A pickle checkpoint (pytorch_model.bin) runs code when unpickled; weights from the hub or a shared
bucket are untrusted input, so they are refused by default with a message that says what to do.
"""
from __future__ import annotations

import os

ALLOW_PICKLE_ENV = "CNPIPE_ALLOW_PICKLE_WEIGHTS"  # set by cnpipe.cli from PipelineConfig.allow_pickle_weights


class PickleWeightsRefused(OSError):
    pass


def pickle_allowed() -> bool:
    return os.environ.get(ALLOW_PICKLE_ENV) == "1"


def load_pretrained(cls, name_or_path: str, **kwargs):
    """`cls.from_pretrained` with the weight-format policy applied, and a clear error when it refuses."""
    allowed = pickle_allowed()
    try:
        return cls.from_pretrained(name_or_path, use_safetensors=None if allowed else True, **kwargs)
    except OSError as err:
        if allowed or "safetensors" not in str(err).lower():
            raise
        raise PickleWeightsRefused(
            f"{name_or_path}{'/' + kwargs['subfolder'] if kwargs.get('subfolder') else ''} has no safetensors weights; "
            "pickle checkpoints are refused (they can run code when loaded). Convert it to safetensors, or set "
            "allow_pickle_weights=true in the config if you trust its source."
        ) from None


def pick_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was configured but no CUDA device is visible")
    return name


def load(model_cls, processor_cls, model_id: str, device: str):
    import torch

    model = load_pretrained(model_cls, model_id)
    # the slow (PIL/numpy) image processors, said explicitly: the fast ones need torchvision, which this CPU torch
    # cannot load, and transformers warns on every load while the choice is left to it
    processor = processor_cls.from_pretrained(model_id, use_fast=False)
    dtype = torch.float16 if device == "cuda" else torch.float32
    return model.to(device=device, dtype=dtype).eval(), processor
