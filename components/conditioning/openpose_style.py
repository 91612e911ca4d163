"""Draw body keypoints as the openpose annotator draws them (controlnet_aux 0.0.10 open_pose/util.py draw_bodypose,
the same as ControlNet 1.1's), the controls ControlNet's openpose models were trained on: the 18 COCO keypoints,
limbs as filled ellipses (stick width 4) in 0.6 of their colour, each painted over the ones before it where
they overlap, then joints as circles of radius 4 in full colour, on black, on a canvas of the detection size
(conditioning.detect_resolution) resized back to the image's size.

MediaPipe gives 33 landmarks; OpenPose's 18 map onto them, with the neck as the shoulders' midpoint.
"""
from __future__ import annotations

import math

import numpy as np

from components.conditioning.resolution import detection_size, to_image_size

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
STICK_WIDTH = 4  # pixels at the detection size, as draw_bodypose
JOINT_RADIUS = 4


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


def draw(keypoints: list[tuple[float, float] | None], width: int, height: int, resolution: int = 0) -> np.ndarray:
    """The skeleton of pixel keypoints (at width × height) drawn at the detection size, returned at width × height."""
    import cv2

    canvas_width, canvas_height = detection_size(width, height, resolution)
    canvas = np.zeros((canvas_height, canvas_width, 3), dtype=np.uint8)
    points = [None if k is None else (k[0] / width * float(canvas_width), k[1] / height * float(canvas_height)) for k in keypoints]
    for (a, b), color in zip(LIMBS, COLORS):
        if points[a] is None or points[b] is None:
            continue
        (xa, ya), (xb, yb) = points[a], points[b]
        length = ((ya - yb) ** 2 + (xa - xb) ** 2) ** 0.5  # draw_bodypose's arithmetic, so that its pixels are ours
        angle = math.degrees(math.atan2(ya - yb, xa - xb))
        center = (int((xa + xb) / 2), int((ya + yb) / 2))
        polygon = cv2.ellipse2Poly(center, (int(length / 2), STICK_WIDTH), int(angle), 0, 360, 1)
        cv2.fillConvexPoly(canvas, polygon, [int(float(c) * 0.6) for c in color])
    for point, color in zip(points, COLORS):
        if point is not None:
            cv2.circle(canvas, (int(point[0]), int(point[1])), JOINT_RADIUS, color, thickness=-1)
    return to_image_size(canvas, width, height)
