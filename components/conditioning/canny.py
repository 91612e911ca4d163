"""Canny edges as ControlNet's annotator and controlnet_aux's CannyDetector make them, white on black: cv2.Canny
on the 3-channel RGB image (the strongest channel's gradient, so a red|green boundary of equal gray value has
its edge, which a grayscale copy loses) at conditioning.detect_resolution, then back at the image's size.

Returned as one channel (three equal channels in the references): stored as a PNG and read back as RGB by every
consumer. Binary when made at the image's own size; resizing back leaves the references' soft edge pixels."""
from __future__ import annotations

import numpy as np

from components.conditioning.resolution import to_detection, to_image_size


def edges(rgb: np.ndarray, low: int, high: int) -> np.ndarray:
    """cv2.Canny on the RGB image itself (evaluate's fidelity metric uses the same edges)."""
    import cv2

    return cv2.Canny(np.ascontiguousarray(rgb), low, high)


class CannyConditioner:
    name = "canny"

    def __init__(self, config) -> None:
        if not 0 <= config.canny_low <= config.canny_high:
            raise ValueError(f"conditioning.canny_low ({config.canny_low}) must be in [0, canny_high ({config.canny_high})]")
        self.low, self.high = config.canny_low, config.canny_high
        self.resolution = config.detect_resolution

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        height, width = rgb.shape[:2]
        return to_image_size(edges(to_detection(rgb, self.resolution), self.low, self.high), width, height)
