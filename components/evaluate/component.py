"""The kfp component around the evaluate stage: samples, a grid and metrics, logged as kfp Metrics.

The Kubeflow UI shows the report as Markdown (`report_md`: text and tables) and as HTML (`report_html`: the grid and the
training curve inlined, since the Markdown viewer cannot load grid.png from the bucket)."""
from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Markdown, Metrics, Output

from cnpipe.kfp_images import DEFAULT_IMAGE


@dsl.component(base_image=DEFAULT_IMAGE, install_kfp_package=False)
def evaluate(
    config_json: str,
    run_id: str,
    trained: Input[Dataset],
    conditioning: Input[Dataset],
    output: Output[Dataset],
    metrics: Output[Metrics],
    report_md: Output[Markdown],
    report_html: Output[HTML],
):
    """Sample the trained ControlNet on held-out control images; CLIP score and control fidelity."""
    from cnpipe import storage
    from components.registry import run_component

    summary = run_component("evaluate", config_json, run_id, {"trained": trained, "conditioning": conditioning}, output)
    for name, value in summary.get("metrics", {}).items():
        if isinstance(value, (int, float)) and value == value:
            metrics.log_metric(name, float(value))
    with open(report_md.path, "w") as f:
        f.write(storage.read_bytes(storage.join(summary["uri"], "report.md")).decode())
    page = storage.join(summary["uri"], "report.html")
    if not storage.exists(page):  # an evaluation finished before report.html was written, reused by this rerun
        from components.evaluate.report import write_html_from_outputs

        write_html_from_outputs(summary["uri"], trained.metadata["dataset_uri"])
    with open(report_html.path, "w") as f:
        f.write(storage.read_bytes(page).decode())
