"""Hand a stage to its family's interpreter: the same `python -m components.<stage>` locally and in an image.

Locally each family is a virtual environment under .venvs/<family>. In a family's image the
interpreter is named by CNPIPE_PYTHON_<FAMILY> or is the current one.
"""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time

from cnpipe.dataset import Manifest, StageOutput, load_output
from components.registry import STAGES

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent


class StageFailed(RuntimeError):
    pass


def family_python(family: str) -> str:
    explicit = os.environ.get(f"CNPIPE_PYTHON_{family.upper()}")
    if explicit:
        return explicit
    venv = REPO_ROOT / ".venvs" / family / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def stage_command(stage: str, config_json: str, inputs: dict[str, str], output_uri: str, part: str = "",
                  family: str = "") -> list[str]:
    spec = STAGES[stage]
    argv = [family_python(family or spec.family), "-m", spec.module, "--config-json", config_json, "--output", output_uri]
    if part:
        argv += ["--part", part]
    for name, uri in inputs.items():
        argv += ["--input", f"{name}={uri}"]
    return argv


def _record_timing(stage: str, part: str, family: str, started: float, returncode: int) -> None:
    """With CNPIPE_STAGE_TIMINGS=<file>, append one JSON line per stage subprocess (bench/end_to_end.py reads
    them to tell a stage's own time from the orchestrator's overhead around it)."""
    path = os.environ.get("CNPIPE_STAGE_TIMINGS")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"stage": stage, "part": part, "family": family, "start": started, "end": time.time(),
                                "returncode": returncode}) + "\n")


def run_stage(stage: str, config_json: str, inputs: dict[str, str], output_uri: str, part: str = "",
              family: str = "") -> "Manifest | StageOutput":
    """Run one stage in its family's interpreter and return what it left. `part` ("i/n") runs one shard
    group only; `family` runs the part of a stage made in another family's environment (conditioning
    types whose libraries live elsewhere), told to the stage as CNPIPE_FAMILY."""
    argv = stage_command(stage, config_json, inputs, output_uri, part, family)
    env = dict(os.environ)
    if family:
        env["CNPIPE_FAMILY"] = family
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    started = time.time()
    completed = subprocess.run(argv, env=env)
    _record_timing(stage, part, family, started, completed.returncode)
    if completed.returncode != 0:
        raise StageFailed(f"stage {stage} exited with status {completed.returncode} ({argv[0]})")
    if part:
        return StageOutput(output_uri, {"part": part})
    if family:
        from cnpipe import storage

        return StageOutput(output_uri, storage.read_json(storage.join(output_uri, "groups", f"{family}.json")))
    return load_output(output_uri)
