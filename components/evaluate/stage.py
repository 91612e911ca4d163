"""Evaluate: generate from held-out controls with the trained ControlNet, measure, and write a report.

Writes grid.png, report.md and metrics.json under the output URI; returns the metrics summary.
Metrics: CLIP score of generated (and, as a yardstick, reference) images against their prompts;
control fidelity (canny: BSDS edge F1, beside the F1 of noise and all-edges maps and of the reference
images on the same controls; pose: PCK, only where MediaPipe is importable); FD_CLIP, the
Fréchet distance between CLIP image features of generated and reference images, only with at least
evaluate.fid_min_images pairs. A metric that is not computed is listed with its reason, never dropped.
"""
from __future__ import annotations

import numpy as np

from cnpipe import storage
from cnpipe.dataset import ContractError, Manifest, conditioning_dataset
from components.encode.inputs import check_settings as check_encode_settings
from components.encode.inputs import control_type_of
from components.evaluate import fidelity, report
from components.evaluate.frechet import frechet_distance
from components.evaluate.samples import select
from components.evaluate.untrained import merge as merge_untrained
from components.evaluate.untrained import untrained_controlnet
from components.report import plots

STAGE = "evaluate"
CLIP_BATCH = 16


def check_settings(config) -> None:
    from pipeline_configs import ConfigError

    check_encode_settings(config)  # resolution, caption source and text encoder are shared with encode
    ev = config.evaluate
    for name in ("num_samples", "num_inference_steps", "batch_size"):
        if getattr(ev, name) < 1:
            raise ConfigError(f"evaluate.{name} must be at least 1, got {getattr(ev, name)}")
    if ev.fid_min_images < 2:
        raise ConfigError(f"evaluate.fid_min_images must be at least 2 (a covariance needs two images), got {ev.fid_min_images}")


def _batched(fn, items: list, size: int = CLIP_BATCH) -> np.ndarray:
    return np.concatenate([fn(items[i:i + size]) for i in range(0, len(items), size)])


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def measure(config, control_type: str, samples: list, generated: list, device: str) -> dict:
    """metrics (numbers), not_computed (metric: reason), per_sample rows and the definitions used."""
    from components.evaluate.clip_score import ClipScorer

    ev, resolution = config.evaluate, config.encode.resolution
    metrics, not_computed, fidelity_table = {}, {}, {}
    per_sample = [{"id": s.id, "prompt": s.prompt} for s in samples]
    definitions = [
        f"clip_score: mean over samples with a non-empty prompt of 100 × cos(CLIP image, CLIP text), "
        f"CLIP = {ev.clip_model}; clip_score_reference: the same for the reference images (a yardstick).",
    ]

    scorer = ClipScorer(ev.clip_model, device)
    generated_features = _batched(scorer.image_features, generated)
    reference_features = _batched(scorer.image_features, [s.reference for s in samples])
    prompted = [i for i, s in enumerate(samples) if s.prompt]
    if prompted:
        prompts = [samples[i].prompt for i in prompted]
        for key, features in (("clip_score", generated_features), ("clip_score_reference", reference_features)):
            scores = scorer.scores(features[prompted], prompts)
            for i, score in zip(prompted, scores):
                per_sample[i][key] = float(score)
            metrics[key] = float(np.mean(scores))
    else:
        not_computed["clip_score"] = "every sample has an empty prompt"
    for row in per_sample:
        row.setdefault("clip_score", None)
        row.setdefault("clip_score_reference", None)

    if control_type == "canny":
        low, high = config.conditioning.canny_low, config.conditioning.canny_high
        yardsticks = {  # the same controls scored for generated images and for the floor and ceiling
            "generated": [fidelity.canny_fidelity(g, s.control, low, high) for g, s in zip(generated, samples)],
            "reference": [fidelity.canny_fidelity(s.reference, s.control, low, high) for s in samples],
            "noise": [fidelity.canny_fidelity(fidelity.noise_image(resolution, ev.seed + i), s.control, low, high)
                      for i, s in enumerate(samples)],
            "all_edges": [fidelity.all_edges_fidelity(s.control) for s in samples],
        }
        for i, row in enumerate(per_sample):
            row["canny_f1"], row["canny_f1_reference"] = yardsticks["generated"][i]["f1"], yardsticks["reference"][i]["f1"]
            floor = max(yardsticks["noise"][i]["f1"], yardsticks["all_edges"][i]["f1"])
            row["canny_fidelity"] = fidelity.above_chance(row["canny_f1"], floor, row["canny_f1_reference"])
        for key in ("f1", "precision", "recall"):
            metrics[f"canny_{key}"] = _mean(r[key] for r in yardsticks["generated"])
        for name in ("reference", "noise", "all_edges"):
            metrics[f"canny_f1_{name}"] = _mean(r["f1"] for r in yardsticks[name])
        metrics["canny_fidelity"] = _mean(r["canny_fidelity"] for r in per_sample)
        fidelity_table = {name: {key: _mean(r[key] for r in results) for key in ("precision", "recall", "f1")}
                          for name, results in yardsticks.items()}
        definitions.append(
            f"canny_f1/precision/recall: Canny edges of the generated image (RGB, thresholds {low}/{high}) against the "
            f"edges of the {resolution}×{resolution} control the ControlNet was given (thinned to one pixel), matched one "
            f"to one within {fidelity.edge_tolerance(resolution)} px (0.75% of the diagonal), as BSDS500. Yardsticks on "
            f"the same controls: canny_f1_reference, the reference images (the ceiling); canny_f1_noise, uniform noise "
            f"images, and canny_f1_all_edges, every pixel an edge (the floor). canny_fidelity: each sample's F1 rescaled "
            f"between its floor (the better of noise and all-edges, 0) and its reference (1), clipped, then averaged: "
            f"0 means no better than an image that needs no model."
        )
    elif control_type == "pose":
        solution = fidelity.mediapipe_pose()
        if solution is None:
            not_computed["pose_fidelity"] = "unavailable in this environment (MediaPipe is not importable here)"
        else:
            pose = fidelity.pose_fidelity(
                solution, [(g, s.reference) for g, s in zip(generated, samples)],
                config.conditioning.pose_min_detection_confidence, config.conditioning.pose_model_complexity,
            )
            for row, score in zip(per_sample, pose["per_sample"]):
                row["pose_pck"] = score
            if pose["pck"] is None:
                not_computed["pose_fidelity"] = "MediaPipe found no person in any reference image"
            else:
                metrics["pose_pck"] = pose["pck"]
            definitions.append(
                "pose_pck: share of the reference's visible MediaPipe keypoints found in the generated image within "
                "0.1 × the reference skeleton's bounding-box side (samples whose reference shows no person are left out)."
            )
    else:
        not_computed["control_fidelity"] = f"no fidelity metric for control type {control_type!r}"

    needed = ev.fid_min_images
    if len(samples) < needed:
        not_computed["fd_clip"] = f"{len(samples)} generated/reference pairs < evaluate.fid_min_images={needed}"
    else:
        metrics["fd_clip"] = frechet_distance(generated_features, reference_features)
    definitions.append(
        "fd_clip: Fréchet distance between L2-normalised CLIP image embeddings of generated and reference images "
        "(FID's formula on CLIP features, as Kynkäänniemi et al. 2023; not comparable to Inception-FID numbers)."
    )
    return {"metrics": metrics, "not_computed": not_computed, "per_sample": per_sample, "definitions": definitions,
            "fidelity": fidelity_table}


def run(config, inputs: dict, output_uri: str) -> dict:
    from cnpipe.torch_models import pick_device
    from components.encode.text import TextEncoder
    from components.evaluate.generate import controlnet_uri, generate, load_pipeline, local_folder

    check_settings(config)
    missing = {"trained", "conditioning"} - set(inputs)
    if missing:
        raise ValueError(f"evaluate needs inputs 'trained' and 'conditioning', missing {sorted(missing)}")
    trained_uri = getattr(inputs["trained"], "uri", inputs["trained"])
    conditioning: Manifest = conditioning_dataset(inputs["conditioning"], config.encode.conditioning_type)
    ev, enc = config.evaluate, config.encode
    control_type = control_type_of(conditioning, config)
    controlnet = controlnet_uri(trained_uri, ev.use_ema)
    selection = select(conditioning, ev.num_samples, enc)
    if not selection.samples:
        raise ContractError(f"no usable row in {conditioning.uri} to evaluate on (skipped: {dict(selection.skipped)})")
    samples = selection.samples

    device = pick_device(ev.device)
    text_encoder = TextEncoder(config.base_model, enc.max_text_length, device)
    with local_folder(controlnet) as folder:
        pipeline = load_pipeline(config.base_model, folder, device)
    generated = generate(pipeline, text_encoder, samples, ev, enc.resolution, ev.batch_size)
    # the same controls, prompts and seeds through the ControlNet training started from (zero convs: the base alone)
    pipeline.controlnet = untrained_controlnet(config.base_model, pipeline.controlnet)
    generated_untrained = generate(pipeline, text_encoder, samples, ev, enc.resolution, ev.batch_size)
    del pipeline, text_encoder
    measured = measure(config, control_type, samples, generated, device)
    measured_untrained = measure(config, control_type, samples, generated_untrained, device)
    merge_untrained(measured, measured_untrained)

    if selection.heldout_fallback:
        chosen = (f"no usable held-out row (encode.holdout_fraction={enc.holdout_fraction}): the FIRST rows were used; "
                  "they were trained on, so these numbers flatter the model")
    else:
        chosen = f"held-out rows (cnpipe.splits, encode.holdout_fraction={enc.holdout_fraction}), never trained on"
    if selection.skipped:
        chosen += f"; rows skipped as unusable: {dict(sorted(selection.skipped.items()))}"
    summary = {
        "uri": output_uri,
        "controlnet": controlnet,
        "base_model": config.base_model.path,
        "control_type": control_type,
        "resolution": enc.resolution,
        "num_inference_steps": ev.num_inference_steps,
        "guidance_scale": ev.guidance_scale,
        "seed": ev.seed,
        "samples": len(samples),
        "heldout_fallback": selection.heldout_fallback,
        "selection": chosen,
        "skipped_rows": dict(selection.skipped),
        "metrics": measured["metrics"],
        # the zero-initialised ControlNet (what training started from) on the same controls, prompts and seeds
        "metrics_untrained": measured_untrained["metrics"],
        "not_computed": measured["not_computed"],
        "definitions": measured["definitions"],
        "fidelity_yardsticks": measured["fidelity"],
    }
    rows = [(s.control, before, image, s.reference) for s, before, image in zip(samples, generated_untrained, generated)]
    grid_png = report.grid(rows, enc.resolution)
    bars = plots.fidelity_bars(summary)
    if bars:
        storage.write_bytes_atomic(storage.join(output_uri, "fidelity.png"), bars)
        summary["fidelity_png"] = "fidelity.png"
    storage.write_bytes_atomic(storage.join(output_uri, "grid.png"), grid_png)
    storage.write_json_atomic(storage.join(output_uri, "metrics.json"), {**summary, "per_sample": measured["per_sample"]})
    storage.write_bytes_atomic(
        storage.join(output_uri, "report.md"), report.markdown(summary, measured["per_sample"]).encode()
    )
    report.write_html(output_uri, trained_uri, summary, measured["per_sample"], grid_png)
    return summary
