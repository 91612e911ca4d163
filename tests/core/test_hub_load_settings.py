"""hub_load's safety settings are checked before any row is read: a byte cap that would refuse every file, and
hf-only settings given to another kind of source (where they would silently do nothing)."""
from __future__ import annotations

import pytest

from components.hub_load.stage import run
from pipeline_configs import ConfigError


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"max_file_bytes": 0}, "hub_load.max_file_bytes must be at least 1"),
        ({"max_file_bytes": -5}, "hub_load.max_file_bytes must be at least 1"),
        ({"allow_local_paths": True}, "apply to kind hf only"),
        ({"revision": "main"}, "apply to kind hf only"),
        ({"kind": "table", "allow_local_paths": True}, "apply to kind hf only"),
    ],
)
def test_bad_safety_settings_fail_before_any_row(tmp_path, images, make_config, settings, message):
    seeds = tmp_path / "seeds"
    seeds.mkdir()
    (seeds / "a.png").write_bytes(images.png())
    settings.setdefault("source", str(seeds))
    with pytest.raises(ConfigError, match=message):
        run(make_config(**settings), {}, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
