"""The kfp component around the report stage: rows per stage, rejections by reason, a contact sheet.

The Kubeflow UI shows it twice: `report_md` (Markdown: the tables; its viewer cannot load the PNGs in the bucket) and
`report_html` (HTML: the same with the contact sheet, the training curve and the evaluation grid inlined)."""
from typing import Optional

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Markdown, Output

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
    report_html: Output[HTML],
    curate: Optional[Input[Dataset]] = None,  # the curate steps, when curate.enabled
    curate_keys: Optional[Input[Dataset]] = None,
    curate_dedup: Optional[Input[Dataset]] = None,
):
    """The run report, also shown in the Kubeflow UI as Markdown and HTML (pictures inlined) artifacts."""
    from cnpipe import storage
    from components.registry import run_component

    inputs = {
        "hub_load": hub_load, "clip_embed": clip_embed, "laion_retrieval": laion_retrieval, "download": download,
        "blip_caption": blip_caption, "curate_keys": curate_keys, "curate_dedup": curate_dedup, "curate": curate,
        "conditioning": conditioning, "encode": encode, "controlnet_train": controlnet_train, "evaluate": evaluate,
    }
    inputs = {name: artifact for name, artifact in inputs.items() if artifact is not None}
    summary = run_component("report", config_json, run_id, inputs, output)
    with open(report_md.path, "w") as f:
        f.write(storage.read_bytes(summary["report"]).decode())
    with open(report_html.path, "w") as f:
        f.write(storage.read_bytes(summary["report_html"]).decode())
