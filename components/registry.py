"""The one place that names the stages: their module and the image family whose environment runs them.

A family is one locked environment (envs/<family>.lock.txt) and, in production, one image.
"""
from dataclasses import dataclass


@dataclass(frozen=True)
class StageSpec:
    name: str
    module: str  # run as `python -m <module>` in the family's interpreter
    family: str
    output_dir: str = ""  # under <root>/<run id>/; default: the stage's name


STAGES = {
    s.name: s
    for s in [
        StageSpec("hub_load", "components.hub_load", "core"),
        StageSpec("clip_embed", "components.clip_embed", "vision"),
        StageSpec("laion_retrieval", "components.laion_retrieval", "core"),
        StageSpec("download", "components.download", "download"),
        StageSpec("blip_caption", "components.blip_caption", "vision"),
        StageSpec("conditioning", "components.conditioning", "conditioning"),
        # When conditioning types span families, each family's task writes its types; this lists them all.
        StageSpec("conditioning_merge", "components.conditioning.merge", "core", output_dir="conditioning"),
        StageSpec("report", "components.report", "core"),
        StageSpec("encode", "components.encode", "vision"),
        StageSpec("controlnet_train", "components.controlnet_train", "train"),
        StageSpec("evaluate", "components.evaluate", "vision"),
    ]
}

FAMILIES = ("core", "vision", "download", "conditioning", "train")

# Conditioning types: name -> (class "module:Class" following components/conditioning/contract.py, the
# image family whose environment has its libraries). A new type is a new folder and one line here;
# configs pick types by name (conditioning.types), and each family's types run in that family's task.
CONDITIONERS = {
    "canny": ("components.conditioning.canny:CannyConditioner", "conditioning"),
    "pose": ("components.conditioning.pose:PoseConditioner", "conditioning"),
    "depth": ("components.depth.conditioner:DepthConditioner", "vision"),
}


def _conditioner(name: str) -> tuple[str, str]:
    if name not in CONDITIONERS:
        raise ValueError(f"unknown conditioning type {name!r}; registered: {', '.join(sorted(CONDITIONERS))}")
    return CONDITIONERS[name]


def conditioner_class(name: str):
    import importlib

    module, _, cls = _conditioner(name)[0].partition(":")
    return getattr(importlib.import_module(module), cls)


def conditioner_family(name: str) -> str:
    return _conditioner(name)[1]


def conditioning_groups(types: list[str]) -> dict[str, list[str]]:
    """family -> the configured types it makes, in config order."""
    groups: dict[str, list[str]] = {}
    for name in types:
        groups.setdefault(conditioner_family(name), []).append(name)
    return groups
