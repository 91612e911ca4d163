"""Pose rows only for plausible people: MediaPipe returns confident skeletons on a motorcycle, patterns and a
cartoon-like horse; the geometric check (components/conditioning/pose.py implausibility) rejects them as
implausible_pose, and keeps real people, through the real stage on photos that packages ship."""
from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
from PIL import Image, UnidentifiedImageError

import pipeline_configs
from cnpipe.dataset import Manifest
from components.conditioning.pose import implausibility
from components.conditioning.stage import check_settings, run

PEOPLE = ("astronaut", "camera", "grace_hopper")  # scikit-image's astronaut and cameraman, matplotlib's portrait


def conditioning_config(**settings) -> pipeline_configs.PipelineConfig:
    config = pipeline_configs.embedded("/unused")
    config.conditioning.workers = 1
    config.conditioning.types = ["pose"]
    for key, value in settings.items():
        setattr(config.conditioning, key, value)
    return pipeline_configs.from_json(config.to_json())


def as_downloaded(image: Image.Image) -> bytes:
    """What the embedded download stage keeps, byte for byte: img2dataset's resize (shorter side 256, OpenCV's area
    filter) and re-encode (OpenCV JPEG, quality 95)."""
    import cv2

    bgr = cv2.cvtColor(np.asarray(image.convert("RGB")), cv2.COLOR_RGB2BGR)
    scale = 256 / min(bgr.shape[:2])
    small = cv2.resize(bgr, (round(bgr.shape[1] * scale), round(bgr.shape[0] * scale)), interpolation=cv2.INTER_AREA)
    return cv2.imencode(".jpg", small, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()


def cartoon_horse(seeds_folder) -> bytes:
    """The black horse silhouette, with a margin as a web page would frame it, after download's re-encode."""
    horse = np.asarray(Image.open(seeds_folder / "horse.jpg").convert("RGB"))
    framed = np.pad(horse, ((horse.shape[0] // 4,) * 2, (horse.shape[1] // 4,) * 2, (0, 0)), mode="edge")
    return as_downloaded(Image.fromarray(framed))


@pytest.fixture(scope="module")
def outcome(tmp_path_factory, seeds_folder, grace_hopper, helpers) -> dict[str, str]:
    """id -> "kept" or the rejection reason, for every photo and pattern of the embedded assets (seeds and the
    web pool's mirrored, cropped and posterized variants), the framed horse, and Grace Hopper's portrait."""
    rows = []
    for folder in (seeds_folder, seeds_folder.parent / "pool"):
        for path in sorted(folder.iterdir()):
            try:
                with Image.open(path) as image:
                    image.verify()
            except (UnidentifiedImageError, OSError, SyntaxError):
                continue  # the assets' deliberately broken files: decode rejections, tested elsewhere
            rows.append({"id": f"{folder.name}/{path.stem}", "image": path.read_bytes()})
    rows.append({"id": "web/horse_framed", "image": cartoon_horse(seeds_folder)})
    mirrored = Image.open(seeds_folder.parent / "pool" / "motorcycle_left_mirror.jpg")
    rows.append({"id": "web/motorcycle_left_mirror", "image": as_downloaded(mirrored)})  # as the embedded run has it
    rows.append({"id": "web/grace_hopper", "image": as_downloaded(grace_hopper)})
    source = helpers.write_captioned(str(tmp_path_factory.mktemp("plausible") / "images"), rows, rows_per_shard=16)
    out = str(tmp_path_factory.mktemp("plausible-out"))
    run(conditioning_config(), {"images": source}, out)
    manifest = Manifest.load(f"{out}/pose")
    result = {r["id"]: "kept" for _, t in manifest.iter_shards() for r in t.to_pylist()}
    result.update({r["id"]: r["reason"] for r in manifest.rejected_table().to_pylist()})
    assert len(result) == len(rows) == manifest.rows_in
    return result


def is_person(row_id: str) -> bool:
    return row_id.split("/", 1)[1].startswith(PEOPLE)


def test_non_person_photos_get_no_pose_row(outcome):
    kept = sorted(i for i, o in outcome.items() if o == "kept" and not is_person(i))
    assert kept == []
    # what MediaPipe fits a skeleton to, and the check refuses: a motorcycle, a cartoon-like horse, two patterns
    implausible = sorted(i for i, o in outcome.items() if o == "implausible_pose")
    assert implausible == ["pool/motorcycle_left_mirror", "pool/pattern_13", "seeds/pattern_0", "web/horse_framed",
                           "web/motorcycle_left_mirror"]
    assert outcome["seeds/chelsea"] == outcome["pool/chelsea_poster"] == "no_pose"  # the cat, also posterized


def test_real_people_keep_their_pose_row(outcome):
    for row_id in ("seeds/astronaut", "seeds/camera", "web/grace_hopper"):
        assert outcome[row_id] == "kept", row_id
    people = {i: o for i, o in outcome.items() if is_person(i)}
    assert "implausible_pose" not in people.values(), people  # the check refuses no person here
    assert sum(o == "kept" for o in people.values()) >= len(people) - 1  # MediaPipe misses the posterized cameraman


# A frontal person in pixels on a 400 x 400 image (COCO-18 order: nose, neck, shoulders, arms, hips, legs, face).
PERSON = [(200, 80), (200, 140), (150, 140), (140, 200), (135, 255), (250, 140), (260, 200), (265, 255),
          (170, 250), (168, 320), (166, 390), (230, 250), (232, 320), (234, 390), (192, 72), (208, 72), (184, 76), (216, 76)]
CFG = pipeline_configs.ConditioningConfig()


def moved(**points) -> list:
    names = {"nose": 0, "right_shoulder": 2, "left_shoulder": 5, "right_hip": 8, "left_hip": 11}
    keypoints = list(PERSON)
    for name, point in points.items():
        keypoints[names[name]] = point
    keypoints[1] = None if keypoints[2] is None or keypoints[5] is None else (
        (keypoints[2][0] + keypoints[5][0]) / 2, (keypoints[2][1] + keypoints[5][1]) / 2)
    return keypoints


def test_each_check_names_what_is_implausible_and_its_setting():
    assert implausibility(PERSON, 400, 400, CFG) is None
    speck = [(200 + (x - 200) / 10, 200 + (y - 200) / 10) for x, y in PERSON]
    assert "pose_min_spread" in implausibility(speck, 400, 400, CFG)
    flat = [(x, 200 + (y - 200) / 40) for x, y in PERSON]  # as wide as the person, squashed into a line
    assert "pose_min_area" in implausibility(flat, 400, 400, CFG)
    folded = moved(right_shoulder=(197, 140), left_shoulder=(203, 140))  # shoulders that nearly meet
    assert "× the shoulder width (> pose_max_limb_ratio 3.0)" in implausibility(folded, 400, 400, CFG)
    assert "head (neck to nose) 0.20×" in implausibility(moved(nose=(200, 120)), 400, 400, CFG)
    headless = moved(nose=None, right_hip=None, left_hip=None)
    assert implausibility(headless, 400, 400, CFG).startswith("no torso")
    assert implausibility(moved(nose=None), 400, 400, CFG) is None  # seen from behind: hips make the torso


def test_thresholds_come_from_the_config():
    folded = moved(right_shoulder=(197, 140), left_shoulder=(203, 140))
    loose = dataclasses.replace(CFG, pose_max_limb_ratio=100.0)
    assert implausibility(folded, 400, 400, loose) is None
    speck = [(200 + (x - 200) / 10, 200 + (y - 200) / 10) for x, y in PERSON]
    assert implausibility(speck, 400, 400, dataclasses.replace(CFG, pose_min_spread=0.0, pose_min_area=0.0)) is None
    strict = dataclasses.replace(CFG, pose_min_head_ratio=0.9)
    assert "pose_min_head_ratio 0.9" in implausibility(PERSON, 400, 400, strict)
    with pytest.raises(pipeline_configs.ConfigError, match="pose_min_area"):
        check_settings(conditioning_config(pose_min_area=-0.1))
