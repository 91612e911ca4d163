"""Draw body keypoints the way OpenPose (and ControlNet's openpose models) expect: the 18 COCO keypoints,
colored limbs as ellipses and colored joints on black.

MediaPipe gives 33 landmarks; OpenPose's 18 map onto them, with the neck as the shoulders' midpoint.
"""
from __future__ import annotations

import math

import numpy as np

# OpenPose COCO-18 order -> MediaPipe pose landmark index ("neck" is derived).
OPENPOSE_FROM_MEDIAPIPE = {
    "nose": 0, "neck": None, "right_shoulder": 12, "right_elbow": 14, "right_wrist": 16, "left_shoulder": 11,
    "left_elbow": 13, "left_wrist": 15, "right_hip": 24, "right_knee": 26, "right_ankle": 28, "left_hip": 23,
    "left_knee": 25, "left_ankle": 27, "right_eye": 5, "left_eye": 2, "right_ear": 8, "left_ear": 7,
}
KEYPOINT_NAMES = list(OPENPOSE_FROM_MEDIAPIPE)

# Limbs as (from, to) in COCO-18 indices, and OpenPose's palette, as in its draw_bodypose.
LIMBS = [(1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10), (1, 11), (11, 12), (12, 13),
         (1, 0), (0, 14), (14, 16), (0, 15), (15, 17)]
COLORS = [(255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0), (0, 255, 0),
          (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255), (0, 0, 255), (85, 0, 255),
          (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85)]


def openpose_keypoints(landmarks, width: int, height: int, min_visibility: float) -> list[tuple[float, float] | None]:
    """MediaPipe normalized landmarks -> 18 pixel keypoints (None where not visible)."""

    def point(index: int):
        lm = landmarks[index]
        if lm.visibility < min_visibility or not (0 <= lm.x <= 1 and 0 <= lm.y <= 1):
            return None
        return lm.x * width, lm.y * height

    keypoints = []
    for name, index in OPENPOSE_FROM_MEDIAPIPE.items():
        if index is not None:
            keypoints.append(point(index))
            continue
        left, right = point(11), point(12)
        keypoints.append(((left[0] + right[0]) / 2, (left[1] + right[1]) / 2) if left and right else None)
    return keypoints


def draw(keypoints: list[tuple[float, float] | None], width: int, height: int) -> np.ndarray:
    import cv2

    canvas = np.zeros((height, width, 3), dtype=np.uint8)
    stick = max(1, round(4 * max(width, height) / 512))
    for (a, b), color in zip(LIMBS, COLORS):
        if keypoints[a] is None or keypoints[b] is None:
            continue
        (xa, ya), (xb, yb) = keypoints[a], keypoints[b]
        length = math.hypot(xa - xb, ya - yb)
        angle = math.degrees(math.atan2(ya - yb, xa - xb))
        polygon = cv2.ellipse2Poly((int((xa + xb) / 2), int((ya + yb) / 2)), (int(length / 2), stick), int(angle), 0, 360, 1)
        limb = canvas.copy()
        cv2.fillConvexPoly(limb, polygon, [int(c * 0.6) for c in color])
        canvas = np.maximum(canvas, limb)
    for keypoint, color in zip(keypoints, COLORS):
        if keypoint is not None:
            cv2.circle(canvas, (int(keypoint[0]), int(keypoint[1])), stick, color, thickness=-1)
    return canvas
