"""Two hosts (processes joined by jax.distributed, 2 CPU devices each) train exactly like one host with
4 devices on the same global batch: each host feeds only its half of every batch."""
from __future__ import annotations

import json
import socket

import numpy as np

from runs import FAST_COMPILE, finish, logged_losses, make_config, start_stage
from synthetic import write_encoded


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_hosts_match_one_host(tiny_sd, tmp_path):
    encoded = write_encoded(str(tmp_path / "encoded"), rows=16, rows_per_shard=5, holdout_fraction=0.0)
    common = dict(max_steps=4, global_batch_size=4, log_every=1, checkpoint_every=2, ema_decay=0.0, learning_rate=1e-3, warmup_steps=0)
    one_host = make_config(tiny_sd, **common)
    two_hosts = make_config(tiny_sd, **common, num_processes=2)
    port = _free_port()
    runs = []
    for process_id in (0, 1):
        env = {"XLA_FLAGS": f"{FAST_COMPILE} --xla_force_host_platform_device_count=2", "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
               "JAX_PROCESS_ID": str(process_id), "JAX_NUM_PROCESSES": "2"}
        log = tmp_path / f"host{process_id}.log"
        runs.append((start_stage(two_hosts, encoded.uri, str(tmp_path / "two_hosts"), env=env, log=log), log))
    log = tmp_path / "single.log"
    runs.append((start_stage(one_host, encoded.uri, str(tmp_path / "one_host"), env={"XLA_FLAGS": f"{FAST_COMPILE} --xla_force_host_platform_device_count=4"}, log=log), log))
    for process, log in runs:
        finish(process, log)

    summary = json.loads((tmp_path / "two_hosts" / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["devices"] == 4
    assert json.loads((tmp_path / "one_host" / "summary.json").read_text())["devices"] == 4
    multi, single = logged_losses(tmp_path / "two_hosts"), logged_losses(tmp_path / "one_host")
    assert len(multi) == len(single) == 4
    np.testing.assert_allclose(multi, single, rtol=0, atol=1e-5)
    assert len(set(np.round(single, 4))) > 1  # distinct batches per step, not one repeated number
