"""scripts/setup_envs.sh says what it installs and how far it is (a first set-up takes minutes), and says nothing,
installing nothing, when every environment is current. Run on a copy with a fake uv: no network, no real install."""
from __future__ import annotations

import os
import pathlib
import shutil
import subprocess

REPO = pathlib.Path(__file__).resolve().parents[2]

FAKE_UV = """#!{bash}
echo "uv $*" >> {log}
if [ "$1" = venv ]; then mkdir -p "${{@: -1}}/bin"; printf '#!/bin/sh\\nexit 0\\n' > "${{@: -1}}/bin/python"; chmod +x "${{@: -1}}/bin/python"; fi
"""


def checkout(tmp_path: pathlib.Path) -> pathlib.Path:
    root = tmp_path / "repo"
    (root / "scripts").mkdir(parents=True)
    (root / "envs").mkdir()
    shutil.copy(REPO / "scripts" / "setup_envs.sh", root / "scripts")
    (root / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    (root / "envs" / "alpha.lock.txt").write_text("# locked\nnumpy==2.0.0\n    # via x\npyarrow==20.0.0\n")
    (root / "envs" / "beta.lock.txt").write_text("six==1.16.0\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "uv").write_text(FAKE_UV.format(bash=shutil.which("bash"), log=tmp_path / "uv.log"))
    (bin_dir / "uv").chmod(0o755)
    return root


def setup(root: pathlib.Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{root.parent / 'bin'}:{os.environ['PATH']}", "FAMILIES": "alpha beta"}
    return subprocess.run(["bash", "scripts/setup_envs.sh"], cwd=root, env=env, capture_output=True, text=True)


def uv_calls(root: pathlib.Path) -> list[str]:
    log = root.parent / "uv.log"
    calls = log.read_text().splitlines() if log.exists() else []
    log.unlink(missing_ok=True)
    return calls


def test_first_set_up_says_what_it_installs_and_how_far_it_is(tmp_path):
    root = checkout(tmp_path)
    done = setup(root)
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert lines[0].startswith("setting up 2 environment(s) under .venvs/: alpha beta")
    assert "[1/2] alpha: installing 2 locked packages (envs/alpha.lock.txt) into .venvs/alpha" in lines
    assert any(line.startswith("[1/2] alpha: ready in ") and line.endswith(")") for line in lines)
    assert any(line.startswith("[2/2] beta: ready in ") for line in lines)
    installs = [c for c in uv_calls(root) if c.startswith("uv pip install") and "-r" in c]
    assert len(installs) == 2 and all("--quiet" in c for c in installs)  # not a terminal: our lines, not uv's


def test_current_environments_cost_nothing_and_a_changed_lock_redoes_only_its_own(tmp_path):
    root = checkout(tmp_path)
    assert setup(root).returncode == 0
    uv_calls(root)
    again = setup(root)
    assert again.returncode == 0 and again.stderr == "" and uv_calls(root) == []
    (root / "envs" / "beta.lock.txt").write_text("six==1.17.0\n")
    changed = setup(root)
    assert changed.stderr.splitlines()[0].startswith("setting up 1 environment(s) under .venvs/: beta")
    assert all(".venvs/beta" in c for c in uv_calls(root) if "--python" in c)
