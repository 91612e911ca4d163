"""The kfp component around the hub_load stage: load a Hugging Face dataset, an image folder or a URL table into id'd shards.

Only URIs cross kfp's boundary (see cnpipe.kfp_bridge); the stage itself runs in its family's interpreter.
"""
from kfp import dsl
from kfp.dsl import Dataset, Input, Output

from cnpipe.kfp_images import DEFAULT_IMAGE


@dsl.component(base_image=DEFAULT_IMAGE, install_kfp_package=False)
def hub_load(
    config_json: str,
    run_id: str,
    output: Output[Dataset],
):
    """Load a Hugging Face dataset, an image folder or a URL table into id'd shards."""
    from components.registry import run_component

    run_component("hub_load", config_json, run_id, {}, output)
