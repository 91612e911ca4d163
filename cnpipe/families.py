"""Hand a stage to its family's interpreter: the same `python -m components.<stage>` locally and in an image.

A library module: it takes a stage's spec (name, module, family: components.registry.StageSpec) and never imports
components/, which sit above it; components.registry.run_stage and stage_command look the spec up by name.

Locally each family is a virtual environment under .venvs/<family>. In a family's image the
interpreter is named by CNPIPE_PYTHON_<FAMILY> or is the current one.
"""
from __future__ import annotations

import collections
import contextlib
import json
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time

from cnpipe.dataset import Manifest, StageOutput, load_output

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent


class StageFailed(RuntimeError):
    pass


TAIL_BYTES = 8192


def _relay(source, sink, tail: collections.deque) -> None:
    """Copy the stage's stderr through as it comes (progress bars included) and keep its last bytes."""
    write = sink.buffer.write if hasattr(sink, "buffer") else lambda b: sink.write(b.decode(errors="replace"))
    try:
        while chunk := os.read(source.fileno(), 65536):
            write(chunk)
            sink.flush()
            tail.extend(chunk)
    except (OSError, ValueError):  # the pipe was closed under us after the stage ended
        pass


def last_lines(tail: bytes, count: int = 12) -> str:
    """The last lines a failed stage printed (its traceback's end), without progress-bar redraws."""
    lines = [line.rsplit("\r", 1)[-1].rstrip() for line in tail.decode(errors="replace").split("\n")]
    return "\n".join([line for line in lines if line.strip()][-count:])


STOP_GRACE_S = 5.0  # how long a stopped stage gets to clean up (its temporaries, its workers) before SIGKILL
# Set by the local driver for its tasks: Ctrl-C reaches the driver and its tasks at once (one process group), and a
# task that stopped its stage on SIGINT raced the driver, which then could no longer see which stage was running.
# Under the driver a task leaves SIGINT to it and stops its stage on the driver's SIGTERM.
DRIVER_STOPS_ENV = "CNPIPE_DRIVER_STOPS_TASKS"


def stop_group(process: subprocess.Popen, grace: float = STOP_GRACE_S) -> None:
    """Stop a stage and every process it started (its own process group: img2dataset's workers, conditioning's
    helpers): SIGTERM, a few seconds to finish, then SIGKILL for whatever is left, so that no orphan outlives it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=grace)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


@contextlib.contextmanager
def stop_stage_on_signal(process: subprocess.Popen):
    """SIGINT or SIGTERM to this process (Ctrl-C, a pod being deleted) stops the stage's whole group and exits at
    once, quietly: the driver says what was interrupted, once. Only where handlers can be set (the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, _frame):
        stop_group(process)
        os._exit(128 + signum)

    on_interrupt = signal.SIG_IGN if os.environ.get(DRIVER_STOPS_ENV) == "1" else stop
    saved = {signal.SIGINT: signal.signal(signal.SIGINT, on_interrupt), signal.SIGTERM: signal.signal(signal.SIGTERM, stop)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def run_and_relay(argv: list[str], env: dict) -> tuple[int, str]:
    """Run a stage with its stderr passed through live; return its exit status and the last lines it wrote,
    so that a failure names its cause where the orchestrator reports it, not only in the stage's log. The stage
    runs in its own process group, which is stopped as a whole on an interrupt and cleared when the stage ends
    (a worker it left behind would otherwise hold the pipe, and the run, open)."""
    tail: collections.deque = collections.deque(maxlen=TAIL_BYTES)
    with subprocess.Popen(argv, env=env, stderr=subprocess.PIPE, start_new_session=True) as process:
        relay = threading.Thread(target=_relay, args=(process.stderr, sys.stderr, tail), daemon=True)
        relay.start()
        try:
            with stop_stage_on_signal(process):
                returncode = process.wait()
        except BaseException:
            stop_group(process, grace=0)
            raise
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # leftovers only: the stage itself has exited
        relay.join(timeout=5)
    return returncode, last_lines(bytes(tail))


def family_python(family: str) -> str:
    explicit = os.environ.get(f"CNPIPE_PYTHON_{family.upper()}")
    if explicit:
        return explicit
    venv = REPO_ROOT / ".venvs" / family / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def stage_command(spec, config_json: str, inputs: dict[str, str], output_uri: str, part: str = "",
                  family: str = "") -> list[str]:
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


def run_stage(spec, config_json: str, inputs: dict[str, str], output_uri: str, part: str = "",
              family: str = "") -> "Manifest | StageOutput":
    """Run one stage in its family's interpreter and return what it left. `part` ("i/n") runs one shard
    group only; `family` runs the part of a stage made in another family's environment (conditioning
    types whose libraries live elsewhere), told to the stage as CNPIPE_FAMILY."""
    stage = spec.name
    argv = stage_command(spec, config_json, inputs, output_uri, part, family)
    env = dict(os.environ)
    if family:
        env["CNPIPE_FAMILY"] = family
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    started = time.time()
    returncode, last_words = run_and_relay(argv, env)
    _record_timing(stage, part, family, started, returncode)
    if returncode != 0:
        raise StageFailed(f"stage {stage} exited with status {returncode} ({argv[0]}); it last wrote:\n{last_words}")
    if part:
        return StageOutput(output_uri, {"part": part})
    if family:
        from cnpipe import storage

        return StageOutput(output_uri, storage.read_json(storage.join(output_uri, "groups", f"{family}.json")))
    return load_output(output_uri)
