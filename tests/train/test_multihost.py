"""Two hosts (processes joined by jax.distributed, 2 CPU devices each) train exactly like one host with
4 devices on the same global batch (process_runs.py): each host feeds only its half of every batch;
caption dropout and EMA included."""
from __future__ import annotations

import json

import numpy as np

from runs import logged_losses


def test_two_hosts_match_one_host(two_host_run):
    config, one_host, two_hosts = two_host_run
    summary = json.loads((two_hosts / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["devices"] == 4
    assert json.loads((one_host / "summary.json").read_text())["devices"] == 4
    multi, single = logged_losses(two_hosts), logged_losses(one_host)
    assert len(multi) == len(single) == config.train.max_steps // config.train.log_every
    np.testing.assert_allclose(multi, single, rtol=0, atol=1e-5)
    assert len(set(np.round(single, 4))) > 1  # distinct batches per step, not one repeated number
