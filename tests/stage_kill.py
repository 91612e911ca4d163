"""Shared by the kill-and-resume tests of every family: run a stage's command, SIGKILL it as soon as it has
committed shards, and read the commit markers (name -> (mtime, content)) to prove a rerun left them alone."""
from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import time

import pytest


def commit_markers(dataset: pathlib.Path) -> dict[str, tuple[int, str]]:
    folder = dataset / "_commits"
    if not folder.exists():
        return {}
    return {p.name: (p.stat().st_mtime_ns, p.read_text()) for p in folder.iterdir()
            if p.suffix == ".json" and not p.name.startswith(".tmp-")}


def kill_after_commits(argv: list[str], env: dict | None, datasets: list[pathlib.Path], commits: int = 1,
                       whole_group: bool = False, timeout_s: float = 180, cwd=None) -> subprocess.Popen:
    """Start `argv`, SIGKILL it once the datasets hold `commits` commit markers in all; the process group too
    with `whole_group` (as a pod is killed: worker processes die with it). Fails the test if it ends first."""
    process = subprocess.Popen(argv, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               start_new_session=whole_group)
    kill = (lambda: os.killpg(process.pid, signal.SIGKILL)) if whole_group else (lambda: os.kill(process.pid, signal.SIGKILL))
    name = " ".join(argv[1:3])  # "-m components.<stage>"
    deadline = time.monotonic() + timeout_s
    while sum(len(commit_markers(d)) for d in datasets) < commits:
        if process.poll() is not None:
            pytest.fail(f"{name} ended (status {process.returncode}) before it could be killed: {process.stderr.read()[-2000:]!r}")
        if time.monotonic() > deadline:
            kill()
            pytest.fail(f"{name}: no shard committed within {timeout_s:.0f} s")
        time.sleep(0.002)
    kill()
    process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL
    return process
