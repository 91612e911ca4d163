"""What a local run writes where a user reads it: kfp.local's task lines, plain in a log file."""
from __future__ import annotations

import logging

from orchestration import local_run


def record(message: str) -> logging.LogRecord:
    return logging.LogRecord("root", logging.INFO, __file__, 1, message, None, None)


def test_task_lines_lose_their_colour_codes_in_a_log_and_keep_them_on_a_terminal():
    coloured = "Executing task \x1b[96m'download'\x1b[0m"
    in_a_log, on_a_terminal = record(coloured), record(coloured)
    assert local_run._KeepStageLines(colour=False).filter(in_a_log)
    assert in_a_log.getMessage() == "Executing task 'download'"
    assert local_run._KeepStageLines(colour=True).filter(on_a_terminal)
    assert on_a_terminal.getMessage() == coloured


def test_the_executor_dump_is_still_dropped():
    assert not local_run._KeepStageLines(colour=False).filter(record("Got executor_input: {...}"))


def test_the_resume_command_keeps_the_settings_that_started_the_run():
    """A run started with a preset and another storage root resumes only under both: the message says so."""
    assert local_run.resume_command("r1", []) == "python pipeline.py run --run-id r1"
    assert local_run.resume_command("r1", ["run", "--preset", "embedded-fill", "--set", "storage.root=/tmp/x y"]) == \
        "python pipeline.py run --preset embedded-fill --set 'storage.root=/tmp/x y' --run-id r1"
    assert local_run.resume_command("r1", ["run", "--run-id", "r1", "--set", "a.b=1"]) == \
        "python pipeline.py run --run-id r1 --set a.b=1"
