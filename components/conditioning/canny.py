"""Canny edges with OpenCV, as ControlNet's canny models were trained on: white edges on black, 3 channels."""
from __future__ import annotations

import numpy as np


class CannyConditioner:
    name = "canny"

    def __init__(self, config) -> None:
        if not 0 <= config.canny_low <= config.canny_high:
            raise ValueError(f"conditioning.canny_low ({config.canny_low}) must be in [0, canny_high ({config.canny_high})]")
        self.low, self.high = config.canny_low, config.canny_high

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        import cv2

        edges = cv2.Canny(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), self.low, self.high)
        return np.repeat(edges[:, :, None], 3, axis=2)
