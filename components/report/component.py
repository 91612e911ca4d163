"""The kfp component around the report stage: rows per stage, rejections by reason, a contact sheet."""
from kfp import dsl
from kfp.dsl import Dataset, Input, Markdown, Output

from cnpipe.kfp_images import DEFAULT_IMAGE


@dsl.component(base_image=DEFAULT_IMAGE, install_kfp_package=False)
def report(
    config_json: str,
    run_id: str,
    hub_load: Input[Dataset],
    clip_embed: Input[Dataset],
    laion_retrieval: Input[Dataset],
    download: Input[Dataset],
    blip_caption: Input[Dataset],
    conditioning: Input[Dataset],
    encode: Input[Dataset],
    controlnet_train: Input[Dataset],
    evaluate: Input[Dataset],
    output: Output[Dataset],
    report_md: Output[Markdown],
):
    """The run report, also shown in the Kubeflow UI as a Markdown artifact."""
    from cnpipe import storage
    from cnpipe.kfp_bridge import run_component

    inputs = {
        "hub_load": hub_load, "clip_embed": clip_embed, "laion_retrieval": laion_retrieval, "download": download,
        "blip_caption": blip_caption, "conditioning": conditioning, "encode": encode,
        "controlnet_train": controlnet_train, "evaluate": evaluate,
    }
    summary = run_component("report", config_json, run_id, inputs, output)
    with open(report_md.path, "w") as f:
        f.write(storage.read_bytes(summary["report"]).decode())
