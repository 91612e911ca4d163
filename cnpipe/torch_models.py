"""Loading transformers models the same way in every torch stage: safetensors only, chosen device, eval mode."""
from __future__ import annotations


def pick_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was configured but no CUDA device is visible")
    return name


def load(model_cls, processor_cls, model_id: str, device: str):
    """Refuses pickle checkpoints: `use_safetensors=True` fails rather than unpickle untrusted weights."""
    import torch

    model = model_cls.from_pretrained(model_id, use_safetensors=True)
    processor = processor_cls.from_pretrained(model_id)
    dtype = torch.float16 if device == "cuda" else torch.float32
    return model.to(device=device, dtype=dtype).eval(), processor
