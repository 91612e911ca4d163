"""The kfp component that lists every conditioning type's dataset once each family's task has finished."""
from kfp import dsl
from kfp.dsl import Dataset, Output

from cnpipe.kfp_images import DEFAULT_IMAGE


@dsl.component(base_image=DEFAULT_IMAGE, install_kfp_package=False)
def conditioning_merge(config_json: str, run_id: str, output: Output[Dataset]):
    """Writes the conditioning output's summary.json from the per-family groups."""
    from components.registry import run_component

    run_component("conditioning_merge", config_json, run_id, {}, output)
