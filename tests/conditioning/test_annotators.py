"""Controls made as the reference annotators make them (the controls pretrained ControlNets were trained on):
canny and the openpose drawing compared pixel for pixel with controlnet_aux 0.0.10's code on shared inputs.

controlnet_aux needs torch and model downloads, so it is not in the conditioning environment; its few lines
that make these controls are copied below from its source (controlnet_aux/util.py, canny/__init__.py,
open_pose/util.py and open_pose/__init__.py of the 0.0.10 wheel), unchanged but for names."""
from __future__ import annotations

import math

import cv2
import numpy as np
import pytest

import pipeline_configs
from cnpipe import images
from cnpipe.dataset import Manifest
from components.conditioning import openpose_style
from components.conditioning.canny import CannyConditioner
from components.conditioning.stage import check_settings, run

# ---- controlnet_aux 0.0.10 ------------------------------------------------------------------------------


def aux_hwc3(x):  # util.py HWC3
    assert x.dtype == np.uint8
    if x.ndim == 2:
        x = x[:, :, None]
    H, W, C = x.shape
    if C == 3:
        return x
    if C == 1:
        return np.concatenate([x, x, x], axis=2)
    color = x[:, :, 0:3].astype(np.float32)
    alpha = x[:, :, 3:4].astype(np.float32) / 255.0
    return (color * alpha + 255.0 * (1.0 - alpha)).clip(0, 255).astype(np.uint8)


def aux_resize_image(input_image, resolution):  # util.py resize_image
    H, W, C = input_image.shape
    H = float(H)
    W = float(W)
    k = float(resolution) / min(H, W)
    H *= k
    W *= k
    H = int(np.round(H / 64.0)) * 64
    W = int(np.round(W / 64.0)) * 64
    return cv2.resize(input_image, (W, H), interpolation=cv2.INTER_LANCZOS4 if k > 1 else cv2.INTER_AREA)


def aux_canny(input_image, low_threshold, high_threshold, detect_resolution, image_resolution):  # canny CannyDetector.__call__
    input_image = aux_hwc3(input_image)
    input_image = aux_resize_image(input_image, detect_resolution)
    detected_map = cv2.Canny(input_image, low_threshold, high_threshold)
    detected_map = aux_hwc3(detected_map)
    img = aux_resize_image(input_image, image_resolution)
    H, W, C = img.shape
    return cv2.resize(detected_map, (W, H), interpolation=cv2.INTER_LINEAR)


def aux_draw_bodypose(canvas, keypoints):  # open_pose/util.py draw_bodypose; keypoints: normalized (x, y) or None
    H, W, C = canvas.shape
    stickwidth = 4
    limbSeq = [[2, 3], [2, 6], [3, 4], [4, 5], [6, 7], [7, 8], [2, 9], [9, 10], [10, 11], [2, 12], [12, 13],
               [13, 14], [2, 1], [1, 15], [15, 17], [1, 16], [16, 18]]
    colors = [[255, 0, 0], [255, 85, 0], [255, 170, 0], [255, 255, 0], [170, 255, 0], [85, 255, 0], [0, 255, 0],
              [0, 255, 85], [0, 255, 170], [0, 255, 255], [0, 170, 255], [0, 85, 255], [0, 0, 255], [85, 0, 255],
              [170, 0, 255], [255, 0, 255], [255, 0, 170], [255, 0, 85]]
    for (k1_index, k2_index), color in zip(limbSeq, colors):
        keypoint1 = keypoints[k1_index - 1]
        keypoint2 = keypoints[k2_index - 1]
        if keypoint1 is None or keypoint2 is None:
            continue
        Y = np.array([keypoint1[0], keypoint2[0]]) * float(W)
        X = np.array([keypoint1[1], keypoint2[1]]) * float(H)
        mX = np.mean(X)
        mY = np.mean(Y)
        length = ((X[0] - X[1]) ** 2 + (Y[0] - Y[1]) ** 2) ** 0.5
        angle = math.degrees(math.atan2(X[0] - X[1], Y[0] - Y[1]))
        polygon = cv2.ellipse2Poly((int(mY), int(mX)), (int(length / 2), stickwidth), int(angle), 0, 360, 1)
        cv2.fillConvexPoly(canvas, polygon, [int(float(c) * 0.6) for c in color])
    for keypoint, color in zip(keypoints, colors):
        if keypoint is None:
            continue
        x, y = keypoint
        x = int(x * W)
        y = int(y * H)
        cv2.circle(canvas, (int(x), int(y)), 4, color, thickness=-1)
    return canvas


def aux_openpose_canvas(keypoints, width, height, detect_resolution, image_resolution):
    """OpenposeDetector.__call__ after detection: drawn at the detection size, resized to the image resolution."""
    H, W, _ = aux_resize_image(np.zeros((height, width, 3), np.uint8), detect_resolution).shape
    canvas = aux_draw_bodypose(np.zeros((H, W, 3), np.uint8), keypoints)
    H, W, _ = aux_resize_image(np.zeros((H, W, 3), np.uint8), image_resolution).shape
    return cv2.resize(aux_hwc3(canvas), (W, H), interpolation=cv2.INTER_LINEAR)


# ---- ours against them -----------------------------------------------------------------------------------


def conditioning_config(**settings) -> pipeline_configs.PipelineConfig:
    config = pipeline_configs.embedded("/unused")
    config.conditioning.workers = 1
    for key, value in settings.items():
        setattr(config.conditioning, key, value)
    return pipeline_configs.from_json(config.to_json())


RED, GREEN = (200, 0, 0), (0, 102, 0)  # the same gray value (60) for OpenCV's RGB->gray


def red_green(width: int = 96, height: int = 64) -> np.ndarray:
    image = np.zeros((height, width, 3), np.uint8)
    image[:, : width // 2], image[:, width // 2 :] = RED, GREEN
    return image


# (image size, detect_resolution) where the references' output has the image's size (their image_resolution the
# shorter side): the detection canvas enlarged back, or the same size. Both ways up.
SAME_AS_REFERENCE = [((768, 512), 256), ((512, 1024), 256), ((512, 768), 384), ((640, 384), 384), ((512, 512), 512)]
# Images smaller than the detection canvas: ours is the references' detection-size control area-averaged down
# (their INTER_LINEAR would drop most one-pixel edges at these 2.7-4x; see components/conditioning/resolution.py).
SHRUNK = [((192, 128), 512), ((128, 192), 512), ((320, 448), 512)]


def reference_canny(rgb: np.ndarray, resolution: int) -> np.ndarray:
    height, width = rgb.shape[:2]
    if ((width, height), resolution) in SHRUNK:
        at_detection = aux_canny(rgb, 100, 200, resolution, resolution)
        return cv2.resize(at_detection, (width, height), interpolation=cv2.INTER_AREA)
    return aux_canny(rgb, 100, 200, resolution, min(width, height))


def test_canny_matches_controlnet_aux_pixel_for_pixel_through_the_stage(tmp_path, astronaut, helpers):
    rows, expected = [], {}
    for (width, height), resolution in SAME_AS_REFERENCE + SHRUNK:
        rgb = np.asarray(astronaut.resize((width, height)))
        ref = reference_canny(rgb, resolution)
        assert ref.shape == (height, width, 3) and (ref[..., :1] == ref).all()
        ours = CannyConditioner(conditioning_config(detect_resolution=resolution).conditioning)(rgb)
        np.testing.assert_array_equal(ours, ref[..., 0], err_msg=f"{width}x{height} at {resolution}")
        if resolution == 512:  # the default: the same through the stage and its stored PNG
            rows.append({"id": f"{width}x{height}", "image": helpers.encode(rgb)})
            expected[f"{width}x{height}"] = ref
    source = helpers.write_captioned(str(tmp_path / "images"), rows, rows_per_shard=2)
    run(conditioning_config(types=["canny"]), {"images": source}, str(tmp_path / "out"))
    stored = {r["id"]: r["control"] for _, t in Manifest.load(str(tmp_path / "out" / "canny")).iter_shards()
              for r in t.to_pylist()}
    assert sorted(stored) == sorted(expected)
    for row_id, ref in expected.items():
        np.testing.assert_array_equal(np.asarray(images.decode_rgb(stored[row_id])), ref, err_msg=row_id)


def test_a_red_green_boundary_of_equal_gray_has_an_edge(tmp_path, helpers):
    image = red_green()
    assert (cv2.cvtColor(image, cv2.COLOR_RGB2GRAY) == 60).all()  # a grayscale copy has nothing to find
    for resolution in (0, 512):
        out = CannyConditioner(conditioning_config(detect_resolution=resolution).conditioning)(image)
        columns = np.flatnonzero(out.max(axis=0))
        assert out[:, 47:49].max(axis=1).min() > 0, resolution  # the boundary, on every row
        assert columns.min() >= 44 and columns.max() <= 51, (resolution, columns)  # and nothing else
    small = red_green(128, 128)  # 4x below the detection canvas: the references' INTER_LINEAR loses the edge
    assert not aux_canny(small, 100, 200, 512, 128).any()
    source = helpers.write_captioned(str(tmp_path / "images"), [{"id": "red-green", "image": helpers.encode(small)}], 1)
    run(conditioning_config(types=["canny"]), {"images": source}, str(tmp_path / "out"))
    (row,) = [r for _, t in Manifest.load(str(tmp_path / "out" / "canny")).iter_shards() for r in t.to_pylist()]
    stored = np.asarray(images.decode_rgb(row["control"]))[:, :, 0]
    assert stored[:, 62:66].max(axis=1).min() > 0 and not stored[:, :60].any() and not stored[:, 68:].any()


# A person with the right forearm across the torso, the left wrist unseen: limbs overlap and a joint is missing.
KEYPOINTS = [(0.50, 0.15), (0.50, 0.30), (0.38, 0.30), (0.40, 0.47), (0.62, 0.50), (0.62, 0.30), (0.66, 0.45), None,
             (0.44, 0.60), (0.43, 0.78), (0.42, 0.95), (0.56, 0.60), (0.57, 0.78), (0.58, 0.95), (0.48, 0.13),
             (0.52, 0.13), (0.46, 0.14), (0.54, 0.14)]


def pixels(keypoints, width, height):
    return [None if k is None else (k[0] * width, k[1] * height) for k in keypoints]


@pytest.mark.parametrize("width,height", [(256, 320), (512, 512), (100, 60)])
def test_openpose_drawing_matches_draw_bodypose_at_the_canvas_size(width, height):
    ours = openpose_style.draw(pixels(KEYPOINTS, width, height), width, height, resolution=0)
    np.testing.assert_array_equal(ours, aux_draw_bodypose(np.zeros((height, width, 3), np.uint8), KEYPOINTS))


@pytest.mark.parametrize("size,resolution", SAME_AS_REFERENCE + SHRUNK)
def test_openpose_drawing_matches_the_detector_at_a_detection_resolution(size, resolution):
    width, height = size
    ours = openpose_style.draw(pixels(KEYPOINTS, width, height), width, height, resolution=resolution)
    if (size, resolution) in SHRUNK:
        canvas = aux_openpose_canvas(KEYPOINTS, width, height, resolution, resolution)
        reference = cv2.resize(canvas, (width, height), interpolation=cv2.INTER_AREA)
    else:
        reference = aux_openpose_canvas(KEYPOINTS, width, height, resolution, min(width, height))
    np.testing.assert_array_equal(ours, reference)


def test_openpose_limbs_paint_over_each_other_in_order_at_six_tenths_of_their_colour():
    """Values from draw_bodypose: a limb is filled with int(0.6 × its colour) over what is there, no blending;
    joints are full-colour circles of radius 4; sticks are 2 × 4 + 1 pixels across."""
    size = 512
    canvas = openpose_style.draw(pixels(KEYPOINTS, size, size), size, size, resolution=size)
    # the right forearm (limb 3, (255, 255, 0)) crosses the left torso side (limb 9, (0, 255, 255)), drawn later
    (x1, y1), (x2, y2) = (0.40 * size, 0.47 * size), (0.62 * size, 0.50 * size)
    (x3, y3), (x4, y4) = (0.50 * size, 0.30 * size), (0.56 * size, 0.60 * size)
    t = ((x1 - x3) * (y3 - y4) - (y1 - y3) * (x3 - x4)) / ((x1 - x2) * (y3 - y4) - (y1 - y2) * (x3 - x4))
    crossing = (round(y1 + t * (y2 - y1)), round(x1 + t * (x2 - x1)))
    assert tuple(canvas[crossing]) == (0, 153, 153)  # not (153, 153, 153), the channel-wise maximum of the two
    forearm_middle = (round((y1 + 0.9 * (y2 - y1))), round(x1 + 0.9 * (x2 - x1)))
    assert tuple(canvas[forearm_middle]) == (153, 153, 0)
    assert tuple(canvas[int(0.30 * size), int(0.38 * size)]) == (255, 170, 0)  # the right shoulder (keypoint 2), full colour
    thigh_x = int(0.565 * size)  # the left thigh is near vertical: 9 pixels across at its middle row
    row = canvas[int(0.69 * size), thigh_x - 12 : thigh_x + 13]
    assert (row == (0, 102, 153)).all(axis=1).sum() == 9  # (0, 170, 255) × 0.6


def test_detect_resolution_is_checked():
    for bad in (32, -1):
        with pytest.raises(pipeline_configs.ConfigError, match="detect_resolution"):
            check_settings(conditioning_config(detect_resolution=bad))
    check_settings(conditioning_config(detect_resolution=0))
