"""Keeps the notices native libraries print straight to file descriptor 2 out of a stage's log, when a user can
do nothing about them: MediaPipe's graph (through absl) and TFLite announce, for every worker's pose graph, that
they created an XNNPACK delegate, that absl logs before InitializeLog, and which optional features they turned
off. Python's own stderr (progress, our messages) goes straight to the terminal or log; only what native code
writes to fd 2 passes through the filter, and every line that matches no known notice is kept.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import sys
import threading

MEDIAPIPE_NOTICES = (
    rb"^INFO: Created TensorFlow Lite XNNPACK delegate for CPU\.",
    rb"^WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR",
    rb"^W0000 [0-9:. ]+\d+ (inference_feedback_manager|landmark_projection_calculator)\.cc:\d+\]",
)


@contextlib.contextmanager
def native_stderr_without(patterns: tuple[bytes, ...] = MEDIAPIPE_NOTICES):
    """While inside, lines written to fd 2 that match one of `patterns` are dropped; everything else is copied on."""
    compiled = [re.compile(p) for p in patterns]
    sys.stderr.flush()
    real = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)
    python_stderr = sys.stderr
    sys.stderr = io.TextIOWrapper(os.fdopen(os.dup(real), "wb", buffering=0), write_through=True,
                                  encoding=python_stderr.encoding or "utf-8", errors="backslashreplace")

    def pump() -> None:
        with os.fdopen(read_end, "rb") as pipe:
            for line in pipe:
                if not any(p.search(line) for p in compiled):
                    os.write(real, line)

    thread = threading.Thread(target=pump, name="native-stderr-filter", daemon=True)
    thread.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        sys.stderr = python_stderr
        os.dup2(real, 2)  # the pipe's last writer is gone: the pump reads to its end and stops
        thread.join(timeout=5)
        os.close(real)
