"""The kfp component around the controlnet_train stage: train the ControlNet (JAX) and export it for diffusers.

Only URIs cross kfp's boundary (see cnpipe.kfp_bridge); the stage itself runs in its family's interpreter.
"""
from kfp import dsl
from kfp.dsl import Dataset, Input, Output

from cnpipe.kfp_images import DEFAULT_IMAGE


@dsl.component(base_image=DEFAULT_IMAGE, install_kfp_package=False)
def controlnet_train(
    config_json: str,
    run_id: str,
    encoded: Input[Dataset],
    output: Output[Dataset],
):
    """Train the ControlNet (JAX) and export it for diffusers."""
    from components.registry import run_component

    run_component("controlnet_train", config_json, run_id, {"encoded": encoded}, output)
