"""The kfp component around the clip_embed stage: cLIP image embeddings, L2-normalised.

Only URIs cross kfp's boundary (see cnpipe.kfp_bridge); the stage itself runs in its family's interpreter.
A per-image stage: `part`/`parts` make the task one shard group of a fan-out (pipeline.py).
"""
from kfp import dsl
from kfp.dsl import Dataset, Input, Output

from cnpipe.kfp_images import DEFAULT_IMAGE


@dsl.component(base_image=DEFAULT_IMAGE, install_kfp_package=False)
def clip_embed(
    config_json: str,
    run_id: str,
    seeds: Input[Dataset],
    output: Output[Dataset],
    part: int = -1,
    parts: int = 1,
):
    """CLIP image embeddings, L2-normalised."""
    from components.registry import run_component

    run_component("clip_embed", config_json, run_id, {"seeds": seeds}, output, part, parts)
