"""Control fidelity: does the generated image follow its control?

canny: F1 between the Canny edges of the generated image (the conditioning stage's thresholds) and
the control's edges, an edge counting as matched when one of the other set lies within a tolerance
of 0.75% of the image diagonal (BSDS500's default maxDist; at least 1 px: 1 px at 64², 5 px at 512²).
pose: PCK@0.1: the share of the reference image's visible MediaPipe keypoints that the generated
image has within 0.1 × the reference skeleton's bounding-box side. Needs MediaPipe, which only
the conditioning image carries; where it is not importable the metric is reported unavailable.
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image

from components.encode.pixels import square_crop

BSDS_MAX_DIST = 0.0075
PCK_ALPHA = 0.1
VISIBLE = 0.5


def edge_tolerance(resolution: int) -> int:
    return max(1, round(BSDS_MAX_DIST * math.hypot(resolution, resolution)))


def control_edges(control: Image.Image, resolution: int) -> np.ndarray:
    """The control's edge map at R×R: a pixel is an edge when any edge pixel falls in its footprint.

    A box filter then `> 0` keeps thin edges that interpolation would fade below any threshold.
    """
    return np.asarray(square_crop(control.convert("L"), resolution, Image.Resampling.BOX)) > 0


def canny_edges(image: Image.Image, low: int, high: int) -> np.ndarray:
    import cv2

    return cv2.Canny(np.asarray(image.convert("L")), low, high) > 0


def _distance_to(edges: np.ndarray) -> np.ndarray:
    """Euclidean distance of every pixel to the nearest edge pixel."""
    import cv2

    return cv2.distanceTransform(np.where(edges, 0, 255).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)


def edge_f1(predicted: np.ndarray, target: np.ndarray, tolerance: int) -> dict[str, float]:
    """Precision, recall and F1 of edge maps with a distance tolerance; two empty maps agree fully."""
    def matched_share(source: np.ndarray, other: np.ndarray) -> float:
        if not source.any():
            return 1.0 if not other.any() else 0.0
        if not other.any():
            return 0.0
        return float((_distance_to(other)[source] <= tolerance).mean())

    precision, recall = matched_share(predicted, target), matched_share(target, predicted)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def canny_fidelity(generated: Image.Image, control: Image.Image, resolution: int, low: int, high: int) -> dict[str, float]:
    return edge_f1(canny_edges(generated, low, high), control_edges(control, resolution), edge_tolerance(resolution))


def mediapipe_pose():
    """MediaPipe's legacy pose solution, or None where MediaPipe is not installed (the vision image)."""
    try:
        import mediapipe
    except ImportError:
        return None
    return mediapipe.solutions.pose


def pose_keypoints(detector, image: Image.Image) -> np.ndarray | None:
    """[33, 3] pixel x, pixel y, visibility; None when no person is found."""
    result = detector.process(np.asarray(image.convert("RGB")))
    if result.pose_landmarks is None:
        return None
    width, height = image.size
    return np.array([[p.x * width, p.y * height, p.visibility] for p in result.pose_landmarks.landmark])


def pck(generated: np.ndarray | None, reference: np.ndarray) -> float | None:
    """PCK@0.1 of `generated` against `reference`; None when the reference shows no visible keypoint."""
    visible = reference[:, 2] >= VISIBLE
    if not visible.any():
        return None
    if generated is None:
        return 0.0
    points = reference[visible, :2]
    threshold = PCK_ALPHA * max(float(np.ptp(points[:, 0])), float(np.ptp(points[:, 1])), 1.0)
    found = generated[visible, 2] >= VISIBLE
    close = np.linalg.norm(generated[visible, :2] - points, axis=1) <= threshold
    return float((found & close).mean())


def pose_fidelity(pose_solution, pairs: list[tuple[Image.Image, Image.Image]], min_detection_confidence: float,
                  model_complexity: int) -> dict:
    """Mean PCK over (generated, reference) pairs whose reference shows a person; per-sample None otherwise."""
    per_sample = []
    with pose_solution.Pose(
        static_image_mode=True, model_complexity=model_complexity, min_detection_confidence=min_detection_confidence
    ) as detector:
        for generated, reference in pairs:
            ref = pose_keypoints(detector, reference)
            per_sample.append(None if ref is None else pck(pose_keypoints(detector, generated), ref))
    scores = [s for s in per_sample if s is not None]
    return {"pck": float(np.mean(scores)) if scores else None, "per_sample": per_sample}
