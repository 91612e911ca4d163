"""Helpers of the training tests: configs on the test base, and the stage run as a real subprocess."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

from base_model import CONDITIONING_CHANNELS, RESOLUTION

REPO = pathlib.Path(__file__).resolve().parents[2]
# XLA flags of every test run (see conftest): unoptimised LLVM code generation, about half the compile time.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
# One configuration for every multi-device process run (resume after SIGKILL, multi-host), so they share
# one uninterrupted reference and one compiled step: caption dropout, EMA and LR warm-up make every piece
# of state (data position, RNG, optimizer, EMA) matter on resume. One row per device and step over the
# 15 training rows (5 are held out): 3 steps an epoch, so the resumed run crosses epoch boundaries.
PROCESS_RUN = dict(max_steps=8, global_batch_size=4, caption_dropout=0.3, checkpoint_every=2, log_every=2,
                   ema_decay=0.9, learning_rate=1e-3, warmup_steps=3)
PROCESS_RUN_DATA = dict(rows=20, rows_per_shard=6, holdout_fraction=0.2)
# The step of every in-process run (overfitting, divergence): one compiled program, shared through the
# on-disk cache (a constant learning rate leaves max_steps out of it). Gradient accumulation and
# gradient checkpointing on, so both are exercised end to end by a run that must learn.
IN_PROCESS_STEP = dict(global_batch_size=4, grad_accum_steps=2, learning_rate=1e-2, lr_schedule="constant", warmup_steps=0,
                       ema_decay=0.9, gradient_checkpointing=True)


def make_config(base_path: str, **train):
    """The embedded preset on the test base at its resolution; `train` overrides TrainConfig fields."""
    import pipeline_configs

    config = pipeline_configs.embedded()
    config.base_model.path = base_path
    config.encode.resolution = RESOLUTION
    defaults = dict(validation_rows=0, log_every=1, checkpoint_every=1000, conditioning_embedding_out_channels=CONDITIONING_CHANNELS)
    for key, value in {**defaults, **train}.items():
        if not hasattr(config.train, key):
            raise KeyError(key)
        setattr(config.train, key, value)
    return config


def devices_env(count: int, **extra: str) -> dict:
    """Environment of a stage process with `count` virtual CPU devices (and the tests' XLA flags)."""
    return {"XLA_FLAGS": f"{FAST_COMPILE} --xla_force_host_platform_device_count={count}", **extra}


def hosts_env(count: int, process_id: int, port: int, devices: int) -> dict:
    """Environment of host `process_id` of a `count`-process run on this machine, `devices` CPU devices each."""
    return devices_env(devices, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_PROCESS_ID=str(process_id),
                       JAX_NUM_PROCESSES=str(count))


def stage_command(config, encoded_uri: str, output_uri: str) -> list[str]:
    return [sys.executable, "-m", "components.controlnet_train", "--config-json", config.to_json(),
            "--input", f"encoded={encoded_uri}", "--output", output_uri]


def start_stage(config, encoded_uri: str, output_uri: str, env: dict, log: pathlib.Path) -> subprocess.Popen:
    with open(log, "wb") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(stage_command(config, encoded_uri, output_uri), cwd=REPO, env={**os.environ, **env},
                                stdout=out, stderr=subprocess.STDOUT)


def logged(output_dir: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def logged_losses(output_dir: pathlib.Path) -> list[float]:
    return [record["loss"] for record in logged(output_dir)]
# The layouts run (layouts.py, one process with 8 CPU devices): replicated vs sharded state on 1, 2, 4, 8 devices.
# Two rows per device at 8 devices; gradient accumulation (the sharded accumulator), clipping, EMA, caption dropout
# and LR warm-up all on, so every piece of the state and of the step takes part.
LAYOUT_RUN = dict(global_batch_size=8, grad_accum_steps=1, caption_dropout=0.3, ema_decay=0.9, learning_rate=1e-3,
                  warmup_steps=2, max_steps=4, lr_schedule="cosine", max_grad_norm=1.0)
LAYOUT_STEPS, RESUME_AT = 4, 2
# (saved by (devices, layout)) -> (resumed in (devices, layout)): both directions, each with a change of device count
RESUMES = (((4, "sharded"), (2, "replicated")), ((2, "replicated"), (8, "sharded")), ((8, "sharded"), (4, "sharded")))
