"""The kfp component around the laion_retrieval stage: image URLs by CLIP similarity from a clip-retrieval kNN service.

Only URIs cross kfp's boundary (see cnpipe.kfp_bridge); the stage itself runs in its family's interpreter.
"""
from kfp import dsl
from kfp.dsl import Dataset, Input, Output

from cnpipe.kfp_images import DEFAULT_IMAGE


@dsl.component(base_image=DEFAULT_IMAGE, install_kfp_package=False)
def laion_retrieval(
    config_json: str,
    run_id: str,
    seeds: Input[Dataset],
    output: Output[Dataset],
):
    """Image URLs by CLIP similarity from a clip-retrieval kNN service."""
    from components.registry import run_component

    run_component("laion_retrieval", config_json, run_id, {"seeds": seeds}, output)
