"""bench/convergence.py's pieces that can be checked small: the circle scorer and time-to-target."""
from __future__ import annotations

import math

from PIL import Image, ImageDraw

from bench.convergence import circle_iou, fit_filled, fit_outline, target_f1, time_to_target

SIZE = 64


def control_and_image(cx: float, cy: float, r: float, shift: float = 0.0) -> tuple[Image.Image, Image.Image]:
    """The fill domain's pair: a white outline on black (the control) and a filled circle on a background."""
    control = Image.new("RGB", (SIZE, SIZE), "black")
    ImageDraw.Draw(control).ellipse((cx - r, cy - r, cx + r, cy + r), outline="white")
    image = Image.new("RGB", (SIZE, SIZE), (30, 90, 200))
    ImageDraw.Draw(image).ellipse((cx + shift - r, cy - r, cx + shift + r, cy + r), fill=(240, 200, 20))
    return control, image


def iou_and_centre_error(control, image) -> tuple[float, float]:
    target, found = fit_outline(control), fit_filled(image)
    return circle_iou(target, found, SIZE), math.hypot(target[0] - found[0], target[1] - found[1])


def test_a_circle_scores_itself_near_perfectly():
    iou, error = iou_and_centre_error(*control_and_image(30, 34, 14))
    assert iou > 0.9 and error < 1.0, (iou, error)


def test_a_shifted_circle_scores_low():
    iou, error = iou_and_centre_error(*control_and_image(22, 32, 10, shift=20))
    assert iou < 0.2 and 19 < error < 21, (iou, error)


def test_an_empty_image_has_no_circle():
    assert fit_filled(Image.new("RGB", (SIZE, SIZE), (30, 90, 200))) is None
    assert fit_outline(Image.new("RGB", (SIZE, SIZE), "black")) is None


def test_time_to_target_is_the_first_checkpoint_reaching_it():
    curve = [{"train_s": 0.0, "edge_f1": 0.05}, {"train_s": 40.0, "edge_f1": 0.3}, {"train_s": 80.0, "edge_f1": 0.52},
             {"train_s": 120.0, "edge_f1": 0.48}, {"train_s": 160.0, "edge_f1": 0.6}]
    assert time_to_target(curve, 0.5) == 80.0
    assert time_to_target(curve, 0.7) is None
    assert target_f1(0.056) == 0.5 and math.isclose(target_f1(0.2), 0.6)
