"""Helpers of the training tests: configs on the tiny base, and the stage run as a real subprocess."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[2]
# XLA flags of every test run (see conftest): unoptimised LLVM code generation, about half the compile time.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def make_config(base_path: str, **train):
    """The embedded preset on the tiny base; `train` overrides TrainConfig fields."""
    import pipeline_configs

    config = pipeline_configs.embedded()
    config.base_model.path = base_path
    defaults = dict(validation_rows=0, log_every=1, checkpoint_every=1000)
    for key, value in {**defaults, **train}.items():
        if not hasattr(config.train, key):
            raise KeyError(key)
        setattr(config.train, key, value)
    return config


def stage_command(config, encoded_uri: str, output_uri: str) -> list[str]:
    return [sys.executable, "-m", "components.controlnet_train", "--config-json", config.to_json(),
            "--input", f"encoded={encoded_uri}", "--output", output_uri]


def start_stage(config, encoded_uri: str, output_uri: str, env: dict | None = None, log: pathlib.Path | None = None) -> subprocess.Popen:
    out = open(log, "wb") if log else subprocess.DEVNULL
    return subprocess.Popen(stage_command(config, encoded_uri, output_uri), cwd=REPO, env={**os.environ, **(env or {})},
                            stdout=out, stderr=subprocess.STDOUT)


def finish(process: subprocess.Popen, log: pathlib.Path | None, timeout: float = 240) -> None:
    code = process.wait(timeout=timeout)
    if code != 0:
        tail = log.read_text()[-4000:] if log else ""
        raise AssertionError(f"stage exited with {code}:\n{tail}")


def logged_losses(output_dir: pathlib.Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
