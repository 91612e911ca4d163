"""Imports run one way: the library (cnpipe/) below the stages (components/), the orchestration (orchestration/,
pipeline.py) above them, and the config module (pipeline_configs.py) below all. A stage's image then needs no
orchestration code, and a change to the runner cannot break a stage's import."""
from __future__ import annotations

import ast
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
LOCAL = ("pipeline", "pipeline_configs", "cnpipe", "components", "orchestration")
# package -> the project's packages it must not import (statically, anywhere in a file, deferred imports included)
FORBIDDEN = {
    "pipeline_configs": {"pipeline", "cnpipe", "components", "orchestration"},
    "cnpipe": {"pipeline", "components", "orchestration"},
    "components": {"pipeline", "orchestration"},
    "orchestration": {"pipeline"},
}


def imported_packages(source: str) -> set[str]:
    """The top-level names of the project's packages that `source` imports (relative imports stay in their package)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & set(LOCAL)


def layer_files(layer: str) -> list[pathlib.Path]:
    path = REPO / layer
    return [REPO / f"{layer}.py"] if not path.is_dir() else sorted(path.rglob("*.py"))


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_no_import_points_up_a_layer(layer):
    files = layer_files(layer)
    assert files, f"no files found for {layer}"
    upward = [f"{path.relative_to(REPO)} imports {', '.join(sorted(wrong))}" for path in files
              if (wrong := imported_packages(path.read_text()) & FORBIDDEN[layer])]
    assert upward == [], "imports that point up a layer:\n" + "\n".join(upward)


def test_the_check_sees_deferred_imports():
    """A deferred import inside a function (as kfp component bodies have) counts like a top-level one."""
    assert imported_packages("def body():\n    from orchestration.local_run import run\n") == {"orchestration"}
    assert imported_packages("import components.registry as r\nfrom . import sibling\n") == {"components"}
