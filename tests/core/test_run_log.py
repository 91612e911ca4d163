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
