"""Canny edges with OpenCV, as ControlNet's canny models were trained on: white edges on black.

Returned as one channel: stored as a 1-bit PNG and read back as RGB (three equal channels) by every consumer."""
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

        return cv2.Canny(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), self.low, self.high)
