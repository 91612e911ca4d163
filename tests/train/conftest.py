"""Fixtures of the training tests.

Compilation and process start-up dominate these tests on two CPU cores, so:
- the stage subprocesses of the resume and multi-host tests start with the session and run while the
  in-process tests do (process_runs.py); the tests that wait on them are ordered last;
- compiled XLA programs are cached on disk (JAX_COMPILATION_CACHE_DIR): runs that compile the same
  step pay once, hence few distinct step configurations (runs.PROCESS_RUN, runs.IN_PROCESS_STEP);
- XLA's LLVM backend is told not to optimise (about half the compile time; the code runs slower,
  which a test of a few steps does not feel). Every run in a comparison uses the same flags;
- where PYTHONDONTWRITEBYTECODE is set, each stage subprocess would compile jax, diffusers and torch
  from source again (~9 s of CPU each): their bytecode is cached under the temp dir instead (never in the repo);
- the models are the small test base (base_model.py) at 32 px.
Subprocesses inherit all of it.
"""
from __future__ import annotations

import os
import sys
import tempfile

import pytest

from runs import FAST_COMPILE

os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "cnpipe-train-tests-jax-cache"))
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()
if os.environ.pop("PYTHONDONTWRITEBYTECODE", None):
    os.environ.setdefault("PYTHONPYCACHEPREFIX", os.path.join(tempfile.gettempdir(), "cnpipe-train-tests-pycache"))
    sys.pycache_prefix, sys.dont_write_bytecode = os.environ["PYTHONPYCACHEPREFIX"], False

PROCESS_FIXTURES = ("resumed_run", "two_host_run", "layout_runs")


def pytest_collection_modifyitems(items):
    """The tests waiting on stage subprocesses go last (stable order otherwise)."""
    items.sort(key=lambda item: any(name in item.fixturenames for name in PROCESS_FIXTURES))


@pytest.fixture(scope="session")
def base(tmp_path_factory) -> str:
    import base_model

    return base_model.ensure(str(tmp_path_factory.getbasetemp() / "models"))


@pytest.fixture(scope="session", autouse=True)
def process_runs(request, base, tmp_path_factory):
    """Starts, at the beginning of the session, the subprocess scenarios that the selected tests need."""
    wanted = {name for item in request.session.items for name in PROCESS_FIXTURES if name in item.fixturenames}
    if not wanted:
        yield None
        return
    from process_runs import ProcessRuns

    runs = ProcessRuns(tmp_path_factory.mktemp("process_runs"), base, resume="resumed_run" in wanted, two_hosts="two_host_run" in wanted,
                       layouts="layout_runs" in wanted)
    yield runs
    runs.close()


@pytest.fixture
def resumed_run(process_runs):
    """(config, reference output, Killed: the SIGKILLed-then-restarted run)."""
    return process_runs.config, process_runs.reference_output(), process_runs.resumed()


@pytest.fixture(scope="session")
def layout_runs(process_runs):
    """(results, arrays) of layouts.py: both state layouts on 1, 2, 4, 8 devices, and resumes across them."""
    return process_runs.layout_results()


@pytest.fixture
def two_host_run(process_runs):
    """(config, reference output (1 process x 4 devices), output of 2 processes x 2 devices)."""
    return process_runs.config, process_runs.reference_output(), process_runs.two_hosts_output()
