"""Fixtures of the training tests.

Compilation dominates these tests on two CPU cores, so: compiled XLA programs are cached on disk
(JAX_COMPILATION_CACHE_DIR: runs that compile the same step pay once), and XLA's LLVM backend is
told not to optimise (about half the compile time; the code runs a little slower, which a test of
a few steps does not feel). Every run in a comparison uses the same flags. Subprocesses inherit both.
"""
from __future__ import annotations

import os
import tempfile

import pytest

from runs import FAST_COMPILE

os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "cnpipe-train-tests-jax-cache"))
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory) -> str:
    from cnpipe.embedded import tiny_sd

    return tiny_sd.ensure(str(tmp_path_factory.getbasetemp() / "models"))

