"""A stage that fails says why where the run reports it, not only in its own log."""
import json
import subprocess
import sys

import pytest

from cnpipe import families
from components import registry


def test_failed_stage_error_carries_its_last_words(tmp_path, monkeypatch, capfd):
    """A malformed config makes hub_load exit with status 2; the orchestrator's error quotes the stage's own message."""
    monkeypatch.setenv("CNPIPE_PYTHON_CORE", sys.executable)
    bad = json.dumps({"hub_load": {"no_such_field": 1}})
    with pytest.raises(families.StageFailed) as failed:
        registry.run_stage("hub_load", bad, {}, str(tmp_path / "out"))
    message = str(failed.value)
    assert "exited with status 2" in message
    assert "no_such_field" in message.split("it last wrote:", 1)[1]
    assert "no_such_field" in capfd.readouterr().err  # still relayed live to the task's log


def test_last_lines_keep_the_end_and_drop_progress_redraws():
    printed = b"".join(b"\rshards %d/9" % i for i in range(10)) + b"\nTraceback\n  line\nValueError: boom\n"
    assert families.last_lines(printed, count=3) == "Traceback\n  line\nValueError: boom"
    assert families.last_lines(printed) == "shards 9/9\nTraceback\n  line\nValueError: boom"


def test_relay_returns_when_a_left_behind_child_holds_the_pipe(tmp_path):
    """A worker that outlives its stage keeps stderr open; the stage's end is still seen at once."""
    orphan = "import subprocess, sys; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)'], stdout=subprocess.DEVNULL); sys.exit(3)"
    done = subprocess.run([sys.executable, "-c", f"from cnpipe.families import run_and_relay; import os, sys; "
                           f"print(run_and_relay([sys.executable, '-c', {orphan!r}], dict(os.environ))[0])"],
                          capture_output=True, text=True, timeout=25, cwd=str(families.REPO_ROOT))
    assert done.stdout.strip() == "3"
