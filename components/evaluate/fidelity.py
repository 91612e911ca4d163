"""Control fidelity: does the generated image follow its control?

canny: BSDS500-style boundary F1 between the Canny edges of the generated image (RGB, the conditioning stage's
thresholds) and the edges of the control exactly as the ControlNet saw it (the R×R control, resized as encode
resizes it, its strokes thinned to one pixel): edge pixels are matched one to one (a maximum bipartite matching,
as BSDS's correspondPixels), a pair at most 0.75% of the image diagonal apart (BSDS500's maxDist; at least 1 px:
1 px at 64², 5 px at 512²). Matched many to one, or against thickened controls, noise and an all-edges map score
above real images; one to one, a surplus of edges costs precision and they score near zero.
pose: PCK@0.1: the share of the reference image's visible MediaPipe keypoints that the generated
image has within 0.1 × the reference skeleton's bounding-box side. Needs MediaPipe, which only
the conditioning image carries; where it is not importable the metric is reported unavailable.
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image

from components.conditioning.canny import edges

BSDS_MAX_DIST = 0.0075
PCK_ALPHA = 0.1
VISIBLE = 0.5


def edge_tolerance(resolution: int) -> int:
    return max(1, round(BSDS_MAX_DIST * math.hypot(resolution, resolution)))


def _thinning_tables() -> tuple[np.ndarray, np.ndarray]:
    """Guo & Hall's two sub-iteration deletion tables (as scikit-image's `thin`, MATLAB's bwmorph 'thin'), indexed
    by the 8 neighbours as bits 0..7 counter-clockwise from east."""
    def table(first: bool) -> np.ndarray:
        out = np.zeros(256, bool)
        for n in range(256):
            p = [bool(n >> i & 1) for i in range(8)]
            crossings = sum(1 for i in (0, 2, 4, 6) if not p[i] and (p[i + 1] or p[(i + 2) % 8]))
            n1 = sum(1 for k in (1, 3, 5, 7) if p[k] or p[k - 1])
            n2 = sum(1 for k in (1, 3, 5, 7) if p[k] or p[(k + 1) % 8])
            g3 = not ((p[1] or p[2] or not p[7]) and p[0]) if first else not ((p[5] or p[6] or not p[3]) and p[4])
            out[n] = crossings == 1 and min(n1, n2) in (2, 3) and g3
        return out

    return table(True), table(False)


_THIN_TABLES = _thinning_tables()
_NEIGHBOUR_BITS = np.array([[8, 4, 2], [16, 0, 1], [32, 64, 128]], np.float32)


def thin(mask: np.ndarray) -> np.ndarray:
    """Strokes of a binary map thinned to one pixel, connectivity kept (BSDS thins maps before matching)."""
    import cv2

    skeleton = mask.astype(np.uint8)
    while True:
        before = int(skeleton.sum())
        for table in _THIN_TABLES:
            neighbours = cv2.filter2D(skeleton, cv2.CV_32F, _NEIGHBOUR_BITS, borderType=cv2.BORDER_CONSTANT)
            skeleton[table[neighbours.astype(np.uint8)] & (skeleton > 0)] = 0
        if int(skeleton.sum()) == before:
            return skeleton.astype(bool)


def control_edges(control: Image.Image) -> np.ndarray:
    """The edges the ControlNet was shown: every lit pixel of the R×R control (`Sample.control`, resized as encode
    resizes it), strokes thinned to their one-pixel centre lines."""
    return thin(np.asarray(control.convert("L")) > 0)


def canny_edges(image: Image.Image, low: int, high: int) -> np.ndarray:
    """Canny on the RGB image, as the conditioning stage makes controls, thinned as the control's edges are (Canny
    leaves two-pixel steps), so that an image scores exactly 1 against a control made from it at this size."""
    return thin(edges(np.asarray(image.convert("RGB")), low, high) > 0)


def _maximum_matching(adjacency: list[list[int]], right_count: int) -> int:
    """Size of a maximum matching of a bipartite graph (left i -> right adjacency[i], nearest first): a greedy
    nearest-free start, then Hopcroft-Karp phases of shortest augmenting paths until none is left."""
    match_left, match_right = [-1] * len(adjacency), [-1] * right_count
    for u, partners in enumerate(adjacency):
        for v in partners:
            if match_right[v] < 0:
                match_left[u], match_right[v] = v, u
                break
    while True:
        layer = [-1] * len(adjacency)
        queue = [u for u, v in enumerate(match_left) if v < 0 and adjacency[u]]
        for u in queue:
            layer[u] = 0
        reachable_free = False
        for u in queue:  # breadth first along alternating paths (the queue grows as it is read)
            for v in adjacency[u]:
                w = match_right[v]
                if w < 0:
                    reachable_free = True
                elif layer[w] < 0:
                    layer[w] = layer[u] + 1
                    queue.append(w)
        if not reachable_free:
            return sum(v >= 0 for v in match_left)
        for root in [u for u, v in enumerate(match_left) if v < 0 and layer[u] == 0]:
            stack, taken, partners = [root], [], [iter(adjacency[root])]
            while stack:  # depth first along the layers, without recursion
                u = stack[-1]
                for v in partners[-1]:
                    w = match_right[v]
                    if w < 0:  # a free right vertex: flip the path
                        for x, y in zip(stack, taken + [v]):
                            match_left[x], match_right[y] = y, x
                        stack = []
                        break
                    if layer[w] == layer[u] + 1:
                        taken.append(v)
                        stack.append(w)
                        partners.append(iter(adjacency[w]))
                        break
                else:
                    layer[u] = -1  # a dead end for the rest of this phase
                    stack.pop()
                    partners.pop()
                    if taken:
                        taken.pop()


def matched_edges(predicted: np.ndarray, target: np.ndarray, tolerance: float) -> int:
    """How many edge pixels of `target` can be paired one to one with edge pixels of `predicted` at most
    `tolerance` pixels away."""
    radius = int(tolerance)
    offsets = sorted(((dy, dx) for dy in range(-radius, radius + 1) for dx in range(-radius, radius + 1)
                      if dy * dy + dx * dx <= tolerance * tolerance), key=lambda o: o[0] ** 2 + o[1] ** 2)
    index = np.full((predicted.shape[0] + 2 * radius, predicted.shape[1] + 2 * radius), -1, np.int64)
    index[radius:radius + predicted.shape[0], radius:radius + predicted.shape[1]][predicted] = np.arange(int(predicted.sum()))
    ys, xs = np.nonzero(target)
    candidates = np.stack([index[ys + radius + dy, xs + radius + dx] for dy, dx in offsets], axis=1)
    adjacency = [row[row >= 0].tolist() for row in candidates]
    return _maximum_matching(adjacency, int(predicted.sum()))


def edge_f1(predicted: np.ndarray, target: np.ndarray, tolerance: float) -> dict[str, float]:
    """Precision, recall and F1 of edge maps matched one to one within a distance; two empty maps agree fully."""
    n_predicted, n_target = int(predicted.sum()), int(target.sum())
    if not n_predicted or not n_target:
        agree = float(n_predicted == n_target)
        return {"precision": agree, "recall": agree, "f1": agree}
    matched = matched_edges(predicted, target, tolerance)
    precision, recall = matched / n_predicted, matched / n_target
    f1 = 2 * precision * recall / (precision + recall) if matched else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def above_chance(score: float, floor: float, ceiling: float) -> float | None:
    """A score rescaled so that what needs no model reaches 0 and the reference image 1, clipped to [0, 1].

    With one-to-one matching, uniform noise still earns an F1 of about 2·d/(d + n) on a control of edge density d
    (0.3-0.5 on dense photos): the raw F1 alone cannot say how far above chance a model is. None when the
    reference itself is no better than the floor (the control says too little to measure)."""
    if ceiling - floor <= 1e-6:
        return None
    return float(min(1.0, max(0.0, (score - floor) / (ceiling - floor))))


def noise_image(resolution: int, seed: int) -> Image.Image:
    """Uniform RGB noise: a generator that ignores its control (the floor)."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (resolution, resolution, 3), dtype=np.uint8))


def canny_fidelity(image: Image.Image, control: Image.Image, low: int, high: int) -> dict[str, float]:
    """`image` against the R×R control it was generated from (both at the same size)."""
    target = control_edges(control)
    return edge_f1(canny_edges(image, low, high), target, edge_tolerance(target.shape[0]))


def all_edges_fidelity(control: Image.Image) -> dict[str, float]:
    """An edge map with every pixel an edge (not thinned), against the control: what a metric blind to spurious
    edges would call perfect."""
    target = control_edges(control)
    return edge_f1(np.ones_like(target), target, edge_tolerance(target.shape[0]))


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
