"""Which container image runs a stage: one image per family, named from the config's images section."""
from __future__ import annotations

# What a component is declared with; every task is then pointed at its family's image (set_container_image).
DEFAULT_IMAGE = "python:3.11-slim"


def image_ref(images_config, family: str) -> str:
    """registry/namespace/controlnet-<family>:tag, e.g. ghcr.io/acme/controlnet-vision:0.1.0
    (the train family names its accelerator variant: controlnet-train-tpu)."""
    parts = [p.strip("/") for p in (images_config.registry, images_config.namespace) if p]
    name = f"{images_config.prefix}{family}"
    if family == "train":
        name += f"-{images_config.train_variant}"
    return "/".join([*parts, name]) + f":{images_config.tag}"
