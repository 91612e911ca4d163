"""The multi-device stage runs of the resume and multi-host tests: real subprocesses, started together
when the session starts, so they work while the in-process tests run (on two CPU cores that overlap,
not the compile of any one step, is what the test suite's wall time hinges on).

All use one configuration (runs.PROCESS_RUN) and data set:
- reference: uninterrupted, 1 process x 4 CPU devices; the yardstick of both tests;
- resume: once the reference has ended (its compiled step is then in the on-disk cache), a run that is
  SIGKILLed as soon as its first checkpoint is published, then the same command on the same output;
- two_hosts: 2 processes x 2 CPU devices joined by jax.distributed, same global batch.
Besides, layouts.py (not a stage run): the state replicated and sharded on 1, 2, 4 and 8 devices, in one process.
"""
from __future__ import annotations

import copy
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import numpy as np

from runs import PROCESS_RUN, PROCESS_RUN_DATA, REPO, devices_env, hosts_env, make_config, start_stage
from synthetic import write_encoded

TIMEOUT_S = 600  # per process; generous, as other jobs may share the two cores


class Run:
    """One stage subprocess and its log."""

    def __init__(self, name: str, config, encoded_uri: str, output: pathlib.Path, env: dict):
        self.name, self.output = name, output
        self.log = output.with_name(f"{output.name}-{name}.log")
        self.process = start_stage(config, encoded_uri, str(output), env=env, log=self.log)

    def wait(self) -> int:
        return self.process.wait(timeout=TIMEOUT_S)

    def check(self) -> None:
        code = self.wait()
        if code != 0:
            raise AssertionError(f"{self.name} exited with {code}:\n{self.tail()}")

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:] if self.log.exists() else ""

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@dataclass
class Killed:
    """What the resume scenario did: the victim's exit code, the last checkpoint it published, the output."""

    returncode: int
    checkpoint: int
    output: pathlib.Path


def latest_checkpoint(folder: pathlib.Path) -> int:
    steps = [int(p.name) for p in folder.iterdir() if p.name.isdigit()] if folder.exists() else []
    return max(steps, default=0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ProcessRuns:
    def __init__(self, root: pathlib.Path, base: str, resume: bool, two_hosts: bool, layouts: bool = False):
        self.layouts = self._start_layouts(root / "layouts", base) if layouts else None
        self.encoded = write_encoded(str(root / "encoded"), **PROCESS_RUN_DATA)
        self.config = make_config(base, **PROCESS_RUN)
        self.root = root
        self.runs: list[Run] = []
        self.reference = self._start("reference", self.config, root / "reference", devices_env(4))
        self.hosts: list[Run] = []
        if two_hosts:
            config = copy.deepcopy(self.config)
            config.train.num_processes = 2
            port = _free_port()
            for index in (0, 1):
                self.hosts.append(self._start(f"host{index}", config, root / "two_hosts", hosts_env(2, index, port, devices=2)))
        self._killed: Killed | None = None
        self._restarted: Run | None = None
        self._resume_error: BaseException | None = None
        self._resume = threading.Thread(target=self._resume_scenario, name="resume-scenario", daemon=True)
        if resume:
            self._resume.start()

    def _start_layouts(self, output: pathlib.Path, base: str) -> subprocess.Popen:
        output.mkdir()
        self.layouts_log = output / "layouts.log"
        env = {**os.environ, **devices_env(8), "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        with open(self.layouts_log, "wb") as log:
            return subprocess.Popen([sys.executable, str(REPO / "tests" / "train" / "layouts.py"), base, str(output)],
                                    cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)

    def layout_results(self) -> tuple[dict, dict]:
        """(results.json, results.npz as a dict) of layouts.py, once it has ended well."""
        code = self.layouts.wait(timeout=TIMEOUT_S)
        if code != 0:
            raise AssertionError(f"layouts.py exited with {code}:\n{self.layouts_log.read_text(errors='replace')[-4000:]}")
        folder = self.layouts_log.parent
        with np.load(folder / "results.npz") as arrays:
            return json.loads((folder / "results.json").read_text()), dict(arrays)

    def _start(self, name: str, config, output: pathlib.Path, env: dict) -> Run:
        run = Run(name, config, self.encoded.uri, output, env)
        self.runs.append(run)
        return run

    def _resume_scenario(self) -> None:
        try:
            self.reference.wait()
            output, every = self.root / "resumed", self.config.train.checkpoint_every
            victim = self._start("victim", self.config, output, devices_env(4))
            deadline = time.monotonic() + TIMEOUT_S
            while latest_checkpoint(output / "checkpoints") < every:
                if victim.process.poll() is not None:
                    raise AssertionError(f"the victim ended ({victim.process.returncode}) before its first checkpoint:\n{victim.tail()}")
                if time.monotonic() > deadline:
                    raise AssertionError(f"no checkpoint appeared in {TIMEOUT_S} s:\n{victim.tail()}")
                time.sleep(0.01)
            os.kill(victim.process.pid, signal.SIGKILL)
            self._killed = Killed(victim.wait(), latest_checkpoint(output / "checkpoints"), output)
            self._restarted = self._start("restarted", self.config, output, devices_env(4))
            self._restarted.wait()
        except BaseException as err:  # re-raised in the test that asks for the result
            self._resume_error = err

    def reference_output(self) -> pathlib.Path:
        self.reference.check()
        return self.reference.output

    def resumed(self) -> Killed:
        """Waits for the resume scenario; the restarted run must have succeeded."""
        self._resume.join(timeout=3 * TIMEOUT_S)
        if self._resume_error is not None:
            raise self._resume_error
        assert self._killed is not None and self._restarted is not None, "the resume scenario did not finish"
        self._restarted.check()
        return self._killed

    def two_hosts_output(self) -> pathlib.Path:
        for host in self.hosts:
            host.check()
        return self.hosts[0].output

    def close(self) -> None:
        for run in self.runs:
            run.kill()
        if self.layouts is not None and self.layouts.poll() is None:
            self.layouts.kill()
            self.layouts.wait()
