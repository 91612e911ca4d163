"""The one place that names the stages: their module and the image family whose environment runs them.

A family is one locked environment (envs/<family>.lock.txt) and, in production, one image.
"""
from dataclasses import dataclass


@dataclass(frozen=True)
class StageSpec:
    name: str
    module: str  # run as `python -m <module>` in the family's interpreter
    family: str


STAGES = {
    s.name: s
    for s in [
        StageSpec("hub_load", "components.hub_load", "core"),
        StageSpec("clip_embed", "components.clip_embed", "vision"),
        StageSpec("laion_retrieval", "components.laion_retrieval", "core"),
        StageSpec("download", "components.download", "download"),
        StageSpec("blip_caption", "components.blip_caption", "vision"),
        StageSpec("conditioning", "components.conditioning", "conditioning"),
        StageSpec("report", "components.report", "core"),
        StageSpec("encode", "components.encode", "vision"),
        StageSpec("controlnet_train", "components.controlnet_train", "train"),
        StageSpec("evaluate", "components.evaluate", "vision"),
    ]
}

FAMILIES = ("core", "vision", "download", "conditioning", "train")

# Conditioning types: name -> "module:Class" following components/conditioning/contract.py.
# A new type is a new module and one line here; configs pick types by name (conditioning.types).
CONDITIONERS = {
    "canny": "components.conditioning.canny:CannyConditioner",
    "pose": "components.conditioning.pose:PoseConditioner",
}


def conditioner_class(name: str):
    import importlib

    if name not in CONDITIONERS:
        raise ValueError(f"unknown conditioning type {name!r}; registered: {', '.join(sorted(CONDITIONERS))}")
    module, _, cls = CONDITIONERS[name].partition(":")
    return getattr(importlib.import_module(module), cls)
