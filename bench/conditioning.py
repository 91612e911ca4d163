"""Conditioning stage vs a plain single-process loop: canny and pose images/s on the same images.

    PYTHONPATH=. .venvs/conditioning/bin/python bench/conditioning.py [--images 1000] [--repeats 3]

ours        components/conditioning/stage.py `run` with the default workers (one thread per core): reads the
            Parquet shards, decodes every image once, makes the control images on the worker threads, encodes
            them as PNG and commits one dataset per type (image, caption and control in every row).
reference   what a user would write to make the same control images: one process, one loop, OpenCV
            throughout (cv2.imdecode, cv2.Canny / one MediaPipe Pose per image drawn as the same skeleton,
            cv2.imencode PNG at OpenCV's fast default), results kept in memory (no dataset written).
compute     the same loop on images already decoded to arrays, without encoding (the bare cv2.Canny /
            Pose.process calls): context for how much of each image's time is the operation itself.

Images: the embedded seeds and pool (those hub_load keeps), replicated to --images.
Writes bench/results/conditioning.json.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

os.environ.setdefault("GLOG_minloglevel", "2")  # MediaPipe's C++ logging, here and in the stage's workers
os.environ.pop("CNPIPE_FAMILY", None)  # make every configured type, as a single-family run does

import benchlib  # noqa: E402  (puts the repo on sys.path)

TYPES = {"canny": ["canny"], "pose": ["pose"], "canny+pose": ["canny", "pose"]}


def input_dataset(root: str, blobs, rows_per_shard: int):
    import pyarrow as pa

    schema = pa.schema([("id", pa.string()), ("image", pa.binary()), ("width", pa.int32()), ("height", pa.int32()),
                        ("url", pa.string()), ("source_caption", pa.string()), ("origin", pa.string()),
                        ("blip_caption", pa.string())])
    columns = benchlib.image_rows(blobs)
    columns["blip_caption"] = ["a picture"] * len(blobs)
    return benchlib.write_dataset(f"{root}/input", columns, schema, rows_per_shard, stage="blip_caption")


def our_stage(config, manifest, root: str, types: list[str]):
    """One full run of the stage into a fresh folder (so nothing is skipped as already done)."""
    import pipeline_configs
    from components.conditioning import stage

    counter = [0]

    def run():
        counter[0] += 1
        out = f"{root}/out-{'-'.join(types)}-{counter[0]}"
        cfg = pipeline_configs.with_overrides(config, [f"conditioning.types={types!r}".replace("'", '"')])
        summary = stage.run(cfg, {"images": manifest}, out)
        shutil.rmtree(out, ignore_errors=True)
        run.last = summary
        return summary

    return run


def plain_loop(config, arrays, blobs, types: list[str], decode_and_encode: bool):
    """The reference (decode_and_encode) or the bare compute, in this process."""
    import cv2
    import mediapipe as mp
    import numpy as np

    from components.conditioning import openpose_style

    cc = config.conditioning

    def run():
        pose = mp.solutions.pose.Pose(static_image_mode=True, model_complexity=cc.pose_model_complexity,
                                      min_detection_confidence=cc.pose_min_detection_confidence) if "pose" in types else None
        found = 0
        for array, (_, blob) in zip(arrays, blobs):
            if decode_and_encode:
                rgb = cv2.cvtColor(cv2.imdecode(np.frombuffer(blob, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
            else:
                rgb = array
            if "canny" in types:
                edges = cv2.Canny(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), cc.canny_low, cc.canny_high)
                if decode_and_encode:
                    cv2.imencode(".png", edges)
            if pose is not None:
                result = pose.process(np.ascontiguousarray(rgb))
                if result.pose_landmarks is not None:
                    found += 1
                    if decode_and_encode:
                        height, width = rgb.shape[:2]
                        keypoints = openpose_style.openpose_keypoints(result.pose_landmarks.landmark, width, height,
                                                                      cc.pose_min_visibility)
                        cv2.imencode(".png", cv2.cvtColor(openpose_style.draw(keypoints, width, height), cv2.COLOR_RGB2BGR))
        if pose is not None:
            pose.close()
        run.found = found
        return found

    return run


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1000, help="images per run (the seeds and pool, replicated)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rows-per-shard", type=int, default=64)
    parser.add_argument("--types", default=",".join(TYPES), help=f"which of {', '.join(TYPES)}")
    args = parser.parse_args(argv)

    import numpy as np

    import pipeline_configs
    from cnpipe import images

    assets = benchlib.ensure_assets()
    blobs = benchlib.replicate(benchlib.usable_images(assets), args.images)
    arrays = [np.asarray(images.decode_rgb(blob)) for _, blob in blobs]  # the reference's pre-decoded images
    config = pipeline_configs.embedded(str(assets))
    workers = config.conditioning.workers or os.cpu_count()
    pixels = sum(a.shape[0] * a.shape[1] for a in arrays) / len(arrays)
    print(f"conditioning: {len(blobs)} images (mean {pixels / 1e3:.0f} kpx), {args.rows_per_shard} rows/shard, "
          f"ours with {workers} workers, {args.repeats} interleaved repeats", file=sys.stderr)

    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-conditioning-") as root:
        manifest = input_dataset(root, blobs, args.rows_per_shard)
        small = input_dataset(f"{root}/small", blobs[:2], args.rows_per_shard)
        # The fixed cost of one stage run (pool start-up, one MediaPipe graph per worker and the parent's check):
        fixed = benchlib.interleaved({"ours on 2 images": our_stage(config, small, root, ["canny", "pose"])}, 1)
        for label in args.types.split(","):
            types = TYPES[label]
            print(f"[{label}]", file=sys.stderr)
            ours = our_stage(config, manifest, root, types)
            reference = plain_loop(config, arrays, blobs, types, decode_and_encode=True)
            compute = plain_loop(config, arrays, blobs, types, decode_and_encode=False)
            seconds = benchlib.interleaved({"ours": ours, "reference": reference, "compute": compute}, args.repeats)
            entry = {side: benchlib.summary(s, len(blobs)) for side, s in seconds.items()}
            entry["ratio_vs_reference"] = benchlib.speed_ratio(entry["ours"], entry["reference"])
            entry["ratio_vs_compute"] = benchlib.speed_ratio(entry["ours"], entry["compute"])
            if "pose" in types:
                kept = ours.last["types"]["pose"]["rows_out"]
                entry["pose_detected_reference"] = reference.found
                entry["pose_rows_kept_ours"] = kept  # also needs shoulders and pose_min_keypoints: <= detected
            results[label] = entry

    rows = []
    for label, e in results.items():
        rows.append([label, e["ours"]["best_per_s"], e["reference"]["best_per_s"], e["compute"]["best_per_s"],
                     e["ratio_vs_reference"]["best"], e["ratio_vs_reference"]["median"], e["ratio_vs_compute"]["best"],
                     " / ".join(f'{e[side]["cpu_ms_per_item"]:.1f}' for side in ("ours", "reference", "compute"))])
    print(f"\nconditioning, {len(blobs)} images, images/s (best of {args.repeats}); ratio = ours/reference throughput")
    benchlib.print_table(["types", "ours", "reference", "compute", "ratio best", "ratio median", "vs compute",
                          "CPU ms/img ours / ref / compute"], rows)
    print(f"fixed cost of one stage run (2 images, canny+pose): {fixed['ours on 2 images']['wall'][0]:.2f} s wall, "
          f"{fixed['ours on 2 images']['cpu'][0]:.2f} s CPU")
    benchlib.write_result("conditioning", {
        "images": len(blobs), "mean_kpixels": round(pixels / 1e3, 1), "rows_per_shard": args.rows_per_shard,
        "workers": workers, "repeats": args.repeats, "fixed_cost_s": round(fixed["ours on 2 images"]["wall"][0], 3),
        "fixed_cost_cpu_s": round(fixed["ours on 2 images"]["cpu"][0], 3),
        "reference": "single-process OpenCV loop: imdecode, Canny / one mediapipe Pose per image + skeleton, imencode PNG",
        "compute": "the same loop on pre-decoded arrays, no encoding",
        "results": results,
    }, libraries=("mediapipe", "opencv-contrib-python"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
