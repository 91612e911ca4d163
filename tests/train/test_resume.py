"""A run SIGKILLed after a checkpoint and started again ends exactly where an uninterrupted run ends.

All are real `python -m components.controlnet_train` processes with 4 CPU devices (process_runs.py).
The run uses caption dropout, EMA and LR warm-up over several epochs, so data
position, RNG and every piece of state must resume.
"""
from __future__ import annotations

import json
import signal

import numpy as np
from safetensors.numpy import load_file

from process_runs import latest_checkpoint
from runs import logged


def test_killed_run_resumes_to_identical_params(resumed_run):
    config, straight, killed = resumed_run
    steps, every = config.train.max_steps, config.train.checkpoint_every
    assert killed.returncode == -signal.SIGKILL
    assert every <= killed.checkpoint < steps  # killed mid-run, after a checkpoint

    resumed = killed.output
    summary = json.loads((resumed / "summary.json").read_text())
    assert summary["resumed_from_step"] == killed.checkpoint and summary["steps"] == steps and summary["devices"] == 4
    assert latest_checkpoint(resumed / "checkpoints") == latest_checkpoint(straight / "checkpoints") == steps
    for folder in ("controlnet_raw", "controlnet"):
        a = load_file(str(straight / folder / "diffusion_pytorch_model.safetensors"))
        b = load_file(str(resumed / folder / "diffusion_pytorch_model.safetensors"))
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_allclose(a[key], b[key], rtol=0, atol=1e-6, err_msg=f"{folder}/{key}")
    # the metrics of both runs agree step for step (resumed steps were logged again, not twice)
    after, reference = logged(resumed), logged(straight)
    assert [r["step"] for r in after] == [r["step"] for r in reference] == list(range(every, steps + 1, every))
    np.testing.assert_allclose([r["loss"] for r in after], [r["loss"] for r in reference], rtol=0, atol=1e-6)
