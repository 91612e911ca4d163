"""Native libraries' notices on fd 2 are dropped; every other line, native or Python, reaches the log."""
from __future__ import annotations

import subprocess
import sys

SCRIPT = r'''
import os, sys
from cnpipe.native_noise import native_stderr_without
with native_stderr_without():
    os.write(2, b"INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\n")
    os.write(2, b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n")
    os.write(2, b"W0000 00:00:1796088986.597763   19516 inference_feedback_manager.cc:114] Feedback manager requires\n")
    os.write(2, b"E0000 00:00:1796088986.6 19516 calculator_graph.cc:928] a real native error\n")
    print("progress 10/20 rows", file=sys.stderr, end="\r")
    print("conditioning: a message of ours", file=sys.stderr)
print("after the filter", file=sys.stderr)
'''


def test_native_notices_are_dropped_and_everything_else_kept(tmp_path):
    import pathlib

    repo = pathlib.Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60,
                          env={"PYTHONPATH": str(repo)})
    assert done.returncode == 0, done.stderr
    assert "XNNPACK" not in done.stderr and "InitializeLog" not in done.stderr and "inference_feedback" not in done.stderr
    for kept in ("a real native error", "progress 10/20 rows", "conditioning: a message of ours", "after the filter"):
        assert kept in done.stderr
