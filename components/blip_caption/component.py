"""The kfp component around the blip_caption stage: a BLIP caption for every image.

Only URIs cross kfp's boundary (see cnpipe.kfp_bridge); the stage itself runs in its family's interpreter.
A per-image stage: `part`/`parts` make the task one shard group of a fan-out (pipeline.py).
"""
from kfp import dsl
from kfp.dsl import Dataset, Input, Output

from cnpipe.kfp_images import DEFAULT_IMAGE


@dsl.component(base_image=DEFAULT_IMAGE, install_kfp_package=False)
def blip_caption(
    config_json: str,
    run_id: str,
    images: Input[Dataset],
    output: Output[Dataset],
    part: int = -1,
    parts: int = 1,
):
    """A BLIP caption for every image."""
    from components.registry import run_component

    run_component("blip_caption", config_json, run_id, {"images": images}, output, part, parts)
