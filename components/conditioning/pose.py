"""Pose with MediaPipe's pose landmarker, drawn as an OpenPose-style skeleton; no person -> NoControl("no_pose"),
a skeleton no person could have -> NoControl("implausible_pose").

MediaPipe fits its 33 landmarks to whatever it is shown: on a motorcycle, a pattern or a cartoon animal it can
return a confident skeleton folded into a line or a speck, which would teach a pose ControlNet to draw people
on objects. `implausibility` checks the skeleton's geometry before it is drawn."""
from __future__ import annotations

import math
import os

import numpy as np

from components.conditioning import openpose_style
from components.conditioning.contract import NoControl

# Body segments (COCO-18 indices) measured against the shoulder width: head (neck-nose), arms, torso sides, legs.
BODY_SEGMENTS = {
    "head": (1, 0), "right upper arm": (2, 3), "right forearm": (3, 4), "left upper arm": (5, 6), "left forearm": (6, 7),
    "right torso side": (1, 8), "right thigh": (8, 9), "right shin": (9, 10),
    "left torso side": (1, 11), "left thigh": (11, 12), "left shin": (12, 13),
}

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


def implausibility(keypoints: list, width: int, height: int, cfg) -> str | None:
    """Why these pixel keypoints (shoulders visible) are no plausible person, or None when they are: a torso (the
    head or a hip beside the shoulders), a spread and an area that are a real share of the image, and body segments
    in human proportion to the shoulder width (a skeleton folded into a line has shoulders that nearly meet)."""
    if keypoints[0] is None and keypoints[8] is None and keypoints[11] is None:
        return "no torso: neither the head nor a hip is visible with the shoulders"
    xs, ys = np.array([k for k in keypoints if k is not None], dtype=float).T
    spread = max(float(np.ptp(xs)) / width, float(np.ptp(ys)) / height)
    if spread < cfg.pose_min_spread:
        return f"the skeleton spans {spread:.3f} of the image (< pose_min_spread {cfg.pose_min_spread})"
    area = float(np.ptp(xs)) * float(np.ptp(ys)) / (width * height)
    if area < cfg.pose_min_area:
        return f"the skeleton's box covers {area:.3f} of the image (< pose_min_area {cfg.pose_min_area})"
    shoulders = math.dist(keypoints[2], keypoints[5])
    ratios = {name: math.dist(keypoints[a], keypoints[b]) / shoulders if shoulders else math.inf
              for name, (a, b) in BODY_SEGMENTS.items() if keypoints[a] is not None and keypoints[b] is not None}
    longest = max(ratios, key=ratios.get, default=None)
    if longest and ratios[longest] > cfg.pose_max_limb_ratio:
        return f"{longest} {ratios[longest]:.2f}× the shoulder width (> pose_max_limb_ratio {cfg.pose_max_limb_ratio})"
    if ratios.get("head", math.inf) < cfg.pose_min_head_ratio:
        return f"head (neck to nose) {ratios['head']:.2f}× the shoulder width (< pose_min_head_ratio {cfg.pose_min_head_ratio})"
    return None


class PoseConditioner:
    name = "pose"

    def __init__(self, config) -> None:
        import mediapipe as mp

        _check_bundled(config.pose_model_complexity)
        self.min_visibility = config.pose_min_visibility
        self.min_keypoints = config.pose_min_keypoints
        self.config = config
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
        reason = implausibility(keypoints, width, height, self.config)
        if reason:
            raise NoControl("implausible_pose", reason)
        return openpose_style.draw(keypoints, width, height, self.config.detect_resolution)
