"""The detection resolution of the reference annotators (ControlNet 1.1's and controlnet_aux's, whose controls the
pretrained ControlNets were trained on): a control is made with the image's shorter side at
conditioning.detect_resolution, both sides rounded to multiples of 64 (controlnet_aux's util.resize_image), then
resized to the image's size, so that edge density and stroke widths do not depend on the size an image arrived in.
0 makes controls at the image's own size.

Back to the image's size, an enlarged control is interpolated linearly, as the references do (cv2.INTER_LINEAR,
the same pixels as theirs); a shrunk one is area-averaged (cv2.INTER_AREA) instead: shrinking by more than 2x,
INTER_LINEAR reads two of every n source pixels, and one-pixel canny edges would vanish from the control."""
from __future__ import annotations

import numpy as np


def detection_size(width: int, height: int, resolution: int) -> tuple[int, int]:
    """(width, height) the annotator works at: resize_image's arithmetic, exactly."""
    if not resolution:
        return width, height
    k = float(resolution) / min(width, height)
    return int(np.round(width * k / 64.0)) * 64, int(np.round(height * k / 64.0)) * 64


def to_detection(rgb: np.ndarray, resolution: int) -> np.ndarray:
    """The image at the detection size: Lanczos when enlarging, area averaging when shrinking, as resize_image."""
    import cv2

    height, width = rgb.shape[:2]
    size = detection_size(width, height, resolution)
    if size == (width, height):
        return rgb
    enlarging = float(resolution) / min(width, height) > 1
    return cv2.resize(rgb, size, interpolation=cv2.INTER_LANCZOS4 if enlarging else cv2.INTER_AREA)


def to_image_size(control: np.ndarray, width: int, height: int) -> np.ndarray:
    """A control made at the detection size, back at the image's size (see the module's docstring)."""
    import cv2

    if control.shape[:2] == (height, width):
        return control
    shrinking = control.shape[0] * control.shape[1] > height * width
    return cv2.resize(control, (width, height), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)
