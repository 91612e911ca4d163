"""The kfp component around the encode stage: vAE latents and text encodings, bfloat16.

Only URIs cross kfp's boundary (see cnpipe.kfp_bridge); the stage itself runs in its family's interpreter.
A per-image stage: `part`/`parts` make the task one shard group of a fan-out (pipeline.py).
"""
from kfp import dsl
from kfp.dsl import Dataset, Input, Output

from cnpipe.kfp_images import DEFAULT_IMAGE


@dsl.component(base_image=DEFAULT_IMAGE, install_kfp_package=False)
def encode(
    config_json: str,
    run_id: str,
    conditioning: Input[Dataset],
    output: Output[Dataset],
    part: int = -1,
    parts: int = 1,
):
    """VAE latents and text encodings, bfloat16."""
    from components.registry import run_component

    run_component("encode", config_json, run_id, {"conditioning": conditioning}, output, part, parts)
