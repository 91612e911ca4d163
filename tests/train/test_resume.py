"""A run SIGKILLed after a checkpoint and started again ends exactly where an uninterrupted run ends.

Both are real `python -m components.controlnet_train` processes. The run uses gradient
accumulation, gradient checkpointing, caption dropout and EMA, so data position, RNG and every piece of state must resume.
"""
from __future__ import annotations

import json
import os
import signal
import time

import numpy as np
from safetensors.numpy import load_file

from runs import finish, make_config, start_stage
from synthetic import write_encoded

STEPS = 16


def _latest_checkpoint(folder) -> int:
    steps = [int(p.name) for p in folder.iterdir() if p.name.isdigit()] if folder.exists() else []
    return max(steps, default=0)


def test_killed_run_resumes_to_identical_params(tiny_sd, tmp_path):
    encoded = write_encoded(str(tmp_path / "encoded"), rows=20, rows_per_shard=6, holdout_fraction=0.2)
    config = make_config(tiny_sd, max_steps=STEPS, global_batch_size=4, grad_accum_steps=2, caption_dropout=0.3,
                         checkpoint_every=4, log_every=4, ema_decay=0.9, learning_rate=1e-3, warmup_steps=3,
                         gradient_checkpointing=True)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    victim = start_stage(config, encoded.uri, str(killed), log=tmp_path / "killed.log")
    deadline = time.monotonic() + 200
    while _latest_checkpoint(killed / "checkpoints") < 4:
        assert victim.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    os.kill(victim.pid, signal.SIGKILL)
    # started only now, so it finds the victim's compiled step in the on-disk compilation cache
    reference = start_stage(config, encoded.uri, str(straight), log=tmp_path / "straight.log")
    victim.wait()
    assert not (killed / "summary.json").exists()
    killed_at = _latest_checkpoint(killed / "checkpoints")
    assert 4 <= killed_at < STEPS

    restarted = start_stage(config, encoded.uri, str(killed), log=tmp_path / "restarted.log")
    finish(restarted, tmp_path / "restarted.log")
    finish(reference, tmp_path / "straight.log")

    summary = json.loads((killed / "summary.json").read_text())
    assert summary["resumed_from_step"] >= 4 and summary["steps"] == STEPS
    assert _latest_checkpoint(killed / "checkpoints") == _latest_checkpoint(straight / "checkpoints") == STEPS
    for folder in ("controlnet_raw", "controlnet"):
        a = load_file(str(straight / folder / "diffusion_pytorch_model.safetensors"))
        b = load_file(str(killed / folder / "diffusion_pytorch_model.safetensors"))
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_allclose(a[key], b[key], rtol=0, atol=1e-6, err_msg=f"{folder}/{key}")
    # the metrics of both runs agree step for step (resumed steps were logged again, not twice)
    lines = lambda d: [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert [r["step"] for r in lines(killed)] == [r["step"] for r in lines(straight)]
    np.testing.assert_allclose([r["loss"] for r in lines(killed)][-3:], [r["loss"] for r in lines(straight)][-3:], atol=1e-6)
