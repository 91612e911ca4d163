"""Pose with MediaPipe's pose landmarker, drawn as an OpenPose-style skeleton; no person -> NoControl("no_pose")."""
from __future__ import annotations

import os

import numpy as np

from components.conditioning import openpose_style
from components.conditioning.contract import NoControl

# The pose models this MediaPipe wheel ships; the others it would download on first use.
_BUNDLED = {1: "pose_landmark_full.tflite"}


def _check_bundled(complexity: int) -> None:
    import mediapipe

    folder = os.path.join(os.path.dirname(mediapipe.__file__), "modules", "pose_landmark")
    names = {0: "pose_landmark_lite.tflite", 1: "pose_landmark_full.tflite", 2: "pose_landmark_heavy.tflite"}
    if complexity not in names:
        raise ValueError(f"conditioning.pose_model_complexity must be 0, 1 or 2, got {complexity}")
    if not os.path.exists(os.path.join(folder, names[complexity])):
        raise ValueError(
            f"conditioning.pose_model_complexity={complexity} needs {names[complexity]}, which this MediaPipe does not ship "
            f"and would download at run time; use 1, or bake the file into {folder} in the image"
        )


class PoseConditioner:
    name = "pose"

    def __init__(self, config) -> None:
        import mediapipe as mp

        _check_bundled(config.pose_model_complexity)
        self.min_visibility = config.pose_min_visibility
        self.min_keypoints = config.pose_min_keypoints
        self.detector = mp.solutions.pose.Pose(
            static_image_mode=True,
            model_complexity=config.pose_model_complexity,
            min_detection_confidence=config.pose_min_detection_confidence,
        )

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        height, width = rgb.shape[:2]
        result = self.detector.process(np.ascontiguousarray(rgb))
        if result.pose_landmarks is None:
            raise NoControl("no_pose", "no person detected")
        keypoints = openpose_style.openpose_keypoints(result.pose_landmarks.landmark, width, height, self.min_visibility)
        found = sum(k is not None for k in keypoints)
        if keypoints[1] is None:
            raise NoControl("no_pose", "shoulders not visible: no body to draw")
        if found < self.min_keypoints:
            raise NoControl("no_pose", f"only {found} visible keypoints (< {self.min_keypoints})")
        return openpose_style.draw(keypoints, width, height)
