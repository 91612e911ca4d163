"""The kfp component around the download stage: the retrieved URLs as images, with img2dataset; seed images pass through.

Only URIs cross kfp's boundary (see cnpipe.kfp_bridge); the stage itself runs in its family's interpreter.
A per-image stage: `part`/`parts` make the task one shard group of a fan-out (pipeline.py).
"""
from kfp import dsl
from kfp.dsl import Dataset, Input, Output

from cnpipe.kfp_images import DEFAULT_IMAGE


@dsl.component(base_image=DEFAULT_IMAGE, install_kfp_package=False)
def download(
    config_json: str,
    run_id: str,
    retrieved: Input[Dataset],
    seeds: Input[Dataset],
    output: Output[Dataset],
    part: int = -1,
    parts: int = 1,
):
    """The retrieved URLs as images, with img2dataset; seed images pass through."""
    from components.registry import run_component

    run_component("download", config_json, run_id, {"retrieved": retrieved, "seeds": seeds}, output, part, parts)
