"""Every input check that can fail, run before any weight is loaded or step compiled.

Three layers, each as soon as its facts are known: the config alone; the device count; the
encoded data against the base model's configs. Each message names the setting or both shapes.
"""
from __future__ import annotations

import math

from components.controlnet_train.distributed import SHARD_STATE


class TrainInputError(ValueError):
    """This training run cannot start; the message says which setting or shape and why."""


SCHEDULES = ("constant", "cosine", "linear")
DTYPES = ("auto", "bfloat16", "float32")


def check_config(config) -> None:
    t, resolution = config.train, config.encode.resolution
    problems = []
    if resolution <= 0 or resolution % 8:
        problems.append(f"encode.resolution={resolution} is not divisible by 8 (latents are 1/8 of the image side)")
    if t.lr_schedule not in SCHEDULES:
        problems.append(f"train.lr_schedule={t.lr_schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if t.compute_dtype not in DTYPES:
        problems.append(f"train.compute_dtype={t.compute_dtype!r}; choose one of {', '.join(DTYPES)}")
    if t.shard_state not in SHARD_STATE:
        problems.append(f"train.shard_state={t.shard_state!r}; choose one of {', '.join(SHARD_STATE)}")
    if not 0 <= t.ema_decay < 1:
        problems.append(f"train.ema_decay={t.ema_decay} must be in [0, 1) (0 turns EMA off)")
    if not 0 <= t.caption_dropout < 1:
        problems.append(f"train.caption_dropout={t.caption_dropout} must be in [0, 1)")
    for name in ("max_steps", "global_batch_size", "grad_accum_steps", "log_every", "checkpoint_every",
                 "keep_checkpoints", "num_processes", "shuffle_window_shards", "validation_inference_steps"):
        if getattr(t, name) < 1:
            problems.append(f"train.{name}={getattr(t, name)} must be at least 1")
    if t.grad_accum_steps >= 1 and t.global_batch_size % t.grad_accum_steps:
        problems.append(f"train.global_batch_size={t.global_batch_size} is not divisible by train.grad_accum_steps={t.grad_accum_steps}")
    if t.global_batch_size % max(t.num_processes, 1):
        problems.append(f"train.global_batch_size={t.global_batch_size} is not divisible by train.num_processes={t.num_processes}")
    if not t.conditioning_embedding_out_channels or min(t.conditioning_embedding_out_channels) < 1:
        problems.append(f"train.conditioning_embedding_out_channels={t.conditioning_embedding_out_channels} must be positive channel counts")
    if t.validation_rows < 0 or t.validation_every < 0:
        problems.append("train.validation_rows and train.validation_every must not be negative")
    if problems:
        raise TrainInputError("; ".join(problems))


def check_devices(config, device_count: int) -> None:
    t = config.train
    micro = t.global_batch_size // t.grad_accum_steps
    if micro % device_count:
        per = f" ({micro} per micro-batch with grad_accum_steps={t.grad_accum_steps})" if t.grad_accum_steps > 1 else ""
        raise TrainInputError(
            f"train.global_batch_size={t.global_batch_size}{per} is not divisible by the {device_count} devices; "
            f"every device must get the same number of rows"
        )


def check_data(config, data, unet_config: dict, vae_config: dict, scheduler_config: dict) -> None:
    """The encode output against the config and the base model: shapes, size, what dropout needs."""
    t, resolution = config.train, config.encode.resolution
    factor = 2 ** (len(vae_config["block_out_channels"]) - 1)
    expected_latent = (unet_config["in_channels"], resolution // factor, resolution // factor)
    control = data.control_size
    if tuple(data.latent_shape) != expected_latent or control != (resolution, resolution):
        raise TrainInputError(
            f"shape mismatch between stages: latents are {list(data.latent_shape)} and control images "
            f"{control[1]}x{control[0]} in {data.manifest.uri}, but encode.resolution={resolution} with the base's "
            f"{factor}x VAE needs latents {list(expected_latent)} and {resolution}x{resolution} controls; re-run encode"
        )
    if data.text_shape[-1] != unet_config["cross_attention_dim"]:
        raise TrainInputError(
            f"text encodings have hidden size {data.text_shape[-1]} (shape {list(data.text_shape)}), the base UNet's "
            f"cross_attention_dim is {unet_config['cross_attention_dim']}: encoded with another text encoder?"
        )
    levels = len(t.conditioning_embedding_out_channels)
    if 2 ** (levels - 1) != factor:
        raise TrainInputError(
            f"train.conditioning_embedding_out_channels has {levels} entries, i.e. {levels - 1} downsamplings, "
            f"but the VAE downsamples by {factor}: use {int(math.log2(factor)) + 1} entries"
        )
    if data.num_train < t.global_batch_size:
        raise TrainInputError(
            f"the dataset has {data.num_train} training rows ({data.heldout_count} more held out), fewer than one "
            f"global batch (train.global_batch_size={t.global_batch_size})"
        )
    if t.caption_dropout > 0 and data.uncond is None:
        raise TrainInputError(f"train.caption_dropout={t.caption_dropout} needs the empty-prompt encoding, which {data.manifest.uri} lacks")
    prediction = scheduler_config.get("prediction_type", "epsilon")
    if prediction not in ("epsilon", "v_prediction"):
        raise TrainInputError(f"the base scheduler's prediction_type={prediction!r}; training supports epsilon and v_prediction")
