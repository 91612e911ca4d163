"""Failures a user meets for real: an output location that cannot be written or fills up, and nothing
half-written left visible; pickle weights refused unless explicitly allowed."""
import errno
import os
import subprocess
import sys

import pyarrow as pa
import pytest

import pipeline_configs
from cnpipe import storage
from cnpipe.dataset import ShardedOutput, ShardResult

REPO = __import__("pathlib").Path(__file__).resolve().parents[2]


def seed_folder(tmp_path, count=6):
    from PIL import Image

    folder = tmp_path / "seeds"
    folder.mkdir()
    for i in range(count):
        Image.new("RGB", (40 + i, 40), (i * 30, 100, 200)).save(folder / f"img{i}.png")
    return folder


def hub_load(tmp_path, output, prefix=(), **env):
    cfg = pipeline_configs.embedded()
    cfg.hub_load.source = str(seed_folder(tmp_path))
    cfg.hub_load.rows_per_shard = 2
    argv = [*prefix, sys.executable, "-m", "components.hub_load", "--config-json", cfg.to_json(), "--output", str(output)]
    return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO), **env})


def as_bound_by_permissions() -> list[str]:
    """A command prefix under which file permissions hold: none for a user; for root (CI containers), root
    without the capabilities that override them (setpriv from util-linux), else the test cannot run."""
    if os.geteuid() != 0:
        return []
    prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner"]
    try:
        probe = subprocess.run([*prefix, "true"], capture_output=True)
    except FileNotFoundError:
        pytest.skip("root, and no setpriv to drop the capabilities that override file permissions")
    if probe.returncode != 0:
        pytest.skip(f"root, and setpriv cannot drop capabilities here: {probe.stderr.decode().strip()}")
    return prefix


def test_read_only_output_is_a_clear_error(tmp_path):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o500)
    done = hub_load(tmp_path, out / "hub_load", prefix=as_bound_by_permissions())
    assert done.returncode == 3 and "cannot write its output" in done.stderr and "Traceback" not in done.stderr
    assert list(out.iterdir()) == []  # nothing half-written


def test_unwritable_output_is_a_clear_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    done = hub_load(tmp_path, blocker / "hub_load")  # a path under a regular file can never be created
    assert done.returncode != 0
    assert done.returncode == 3 and "cannot write its output" in done.stderr
    assert "Traceback" not in done.stderr


def test_disk_full_mid_shard_leaves_nothing_half_written(tmp_path, monkeypatch):
    """ENOSPC while a shard's data file is being written: the error surfaces, no temporary or partial file
    stays visible, no commit marker is written, and a rerun with space completes the shard."""
    schema = pa.schema([("id", pa.string())])
    out = ShardedOutput(str(tmp_path / "stage"), "s", "h", schema)
    real_open = storage.filesystem(str(tmp_path))[0].open
    calls = {"n": 0}

    def failing_open(path, mode="rb", *args, **kwargs):
        handle = real_open(path, mode, *args, **kwargs)
        if "w" in mode and "/data/" in path:
            calls["n"] += 1

            class Full:
                def __enter__(self):
                    return self

                def __exit__(self, *exc):
                    handle.close()

                def __getattr__(self, name):  # the rest of a file's interface (Parquet's writer asks for it)
                    return getattr(handle, name)

                def write(self, data):
                    handle.write(data[: len(data) // 2])
                    raise OSError(errno.ENOSPC, "No space left on device", path)

            return Full()
        return handle

    fs = storage.filesystem(str(tmp_path))[0]
    monkeypatch.setattr(fs, "open", failing_open)
    with pytest.raises(OSError) as err:
        out.commit("part-0", ShardResult(pa.table({"id": ["a", "b"]}, schema=schema)), rows_in=2)
    assert err.value.errno == errno.ENOSPC and calls["n"] == 1
    visible = sorted(p.relative_to(tmp_path).as_posix() for p in (tmp_path / "stage").rglob("*") if p.is_file())
    assert visible == []
    assert not out.is_done("part-0")
    monkeypatch.undo()
    out.commit("part-0", ShardResult(pa.table({"id": ["a", "b"]}, schema=schema)), rows_in=2)
    assert out.finalize(["part-0"], inputs=[]).rows_out == 2
