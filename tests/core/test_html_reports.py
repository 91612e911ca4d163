"""The HTML pages the report and evaluate tasks give the Kubeflow UI: self-contained (every picture inlined as a data
URI, plots as inline SVG, nothing fetched from the bucket), text escaped, large pictures made light."""
import base64
import io
import json
import re

from PIL import Image

from cnpipe.dataset import StageOutput
from components.evaluate import report as evaluate_report
from components.report import html
from components.report.stage import html_page


def png(width: int, height: int, noisy: bool = False) -> bytes:
    import numpy as np

    pixels = np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8) if noisy else \
        np.full((height, width, 3), 200, dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def sources(page: str) -> list[str]:
    return re.findall(r'<img [^>]*src="([^"]*)"', page)


def decoded(source: str) -> bytes:
    assert source.startswith("data:image/")
    return base64.b64decode(source.split(",", 1)[1])


ROWS = [
    {"stage": "hub_load", "uri": "gs://b/r/hub_load", "rows_in": 19, "rows_out": 15, "rows_rejected": 4,
     "rejections": {"corrupt_image": 1, "too_small": 3}, "notes": {"exif_rotated": 2}},
    {"stage": "conditioning/pose", "uri": "gs://b/r/conditioning/pose", "rows_in": 44, "rows_out": 9, "rows_rejected": 35,
     "rejections": {"no_pose": 35}, "notes": {}},
    {"stage": "controlnet_train", "uri": "gs://b/r/controlnet_train", "steps": 6},
]


def test_the_run_report_inlines_every_picture_report_md_shows(tmp_path):
    """The contact sheet, and the loss curve, evaluation grid and fidelity plot that the training section writes
    beside report.md: each inlined, none linked; rows per stage as an inline SVG chart."""
    from components.report import training

    sheet, grid = png(300, 200), png(256, 64)
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "loss": 1.0 / s, "lr": 1e-4}) + "\n" for s in range(1, 11)))
    (tmp_path / "evaluate").mkdir()
    (tmp_path / "evaluate" / "grid.png").write_bytes(grid)
    metrics = {"clip_score": 21.5, "canny_f1": 0.41, "canny_f1_reference": 0.9, "canny_f1_noise": 0.3}
    inputs = {"controlnet_train": StageOutput(str(tmp_path / "train"), {"steps": 10}),
              "evaluate": StageOutput(str(tmp_path / "evaluate"), {"metrics": metrics,
                                                                  "metrics_untrained": {"clip_score": 20.0, "canny_f1": 0.3}})}
    out = tmp_path / "report"
    markdown = "\n".join(training.section(inputs, str(out)))  # writes the pictures report.md links
    linked = re.findall(r"!\[[^]]*\]\(([^)]+)\)", markdown)
    assert sorted(linked) == sorted([training.LOSS_PNG, training.GRID_PNG, training.FIDELITY_PNG])
    page = html_page(ROWS, "embedded <test>", sheet, inputs, output_uri=str(out))
    assert [decoded(s) for s in sources(page)] == [sheet] + [(out / name).read_bytes() for name in
                                                             (training.LOSS_PNG, training.GRID_PNG, training.FIDELITY_PNG)]
    assert decoded(sources(page)[2]) == grid
    assert page.count("<svg") == 1  # rows in/out per stage
    assert "no_pose" in page and "exif_rotated" in page and "untrained ControlNet" in page and "21.5" in page
    assert "embedded &lt;test&gt;" in page and "<test>" not in page
    assert "gs://b/r/hub_load" in page and 'src="gs://' not in page


def test_a_run_without_training_or_evaluation_yet_still_has_its_page():
    page = html_page(ROWS[:2], "partial", None, {})
    assert sources(page) == [] and "<svg" in page and "Evaluation" not in page


def test_a_large_picture_is_inlined_downscaled_as_jpeg():
    big = png(3000, 2000, noisy=True)
    assert len(big) > html.INLINE_PNG_MAX_BYTES
    source = html.image_data_uri(big)
    assert source.startswith("data:image/jpeg;base64,")
    image = Image.open(io.BytesIO(decoded(source)))
    assert max(image.size) == html.INLINE_MAX_SIDE and len(decoded(source)) < len(big)
    small = png(64, 64)
    assert decoded(html.image_data_uri(small)) == small


SUMMARY = {
    "uri": "u", "controlnet": "gs://b/r/controlnet_train/controlnet", "base_model": "sd15", "control_type": "canny",
    "resolution": 512, "num_inference_steps": 30, "guidance_scale": 7.5, "seed": 0, "samples": 2,
    "selection": "held-out rows", "metrics": {"clip_score": 25.1, "canny_f1": 0.5},
    "not_computed": {"fd_clip": "2 pairs < 50"}, "definitions": ["clip_score: 100 × cos"],
    "fidelity_yardsticks": {"generated": {"precision": 0.4, "recall": 0.6, "f1": 0.5},
                            "noise": {"precision": 0.1, "recall": 0.2, "f1": 0.13}},
}
PER_SAMPLE = [{"id": "a", "prompt": "a <b>cat</b>", "clip_score": 25.0}, {"id": "b", "prompt": "", "clip_score": None}]


def test_the_evaluation_page_inlines_its_grid_and_plots_the_training_it_evaluates(tmp_path):
    grid = png(96, 64)
    (tmp_path / "trained").mkdir()
    (tmp_path / "trained" / "metrics.jsonl").write_text(json.dumps({"step": 5, "loss": 0.5, "lr": 1e-5}) + "\n"
                                                        + json.dumps({"step": 10, "loss": 0.4, "lr": 1e-5}) + "\n")
    out = tmp_path / "evaluate"
    bars = png(64, 32)
    out.mkdir()
    (out / "fidelity.png").write_bytes(bars)
    evaluate_report.write_html(str(out), str(tmp_path / "trained"), {**SUMMARY, "fidelity_png": "fidelity.png"}, PER_SAMPLE, grid)
    page = (out / "report.html").read_text()
    assert [decoded(s) for s in sources(page)] == [grid, bars]
    assert "<polyline" in page and "fd_clip" in page and "uniform noise images (the floor)" in page
    assert "a &lt;b&gt;cat&lt;/b&gt;" in page and "(empty prompt)" in page
    # an evaluation finished before report.html existed: the same page from what it left
    (out / "metrics.json").write_text(json.dumps({**SUMMARY, "fidelity_png": "fidelity.png", "per_sample": PER_SAMPLE}))
    (out / "grid.png").write_bytes(grid)
    (out / "report.html").unlink()
    evaluate_report.write_html_from_outputs(str(out), str(tmp_path / "trained"))
    assert (out / "report.html").read_text() == page
