"""Per-stage progress (rows, rate, ETA): a live bar in a terminal, plain lines in a log.

A pod's log or a redirected file is read line by line: a bar redrawn with carriage returns (and a JSON line
glued to its last state) is noise there, so when stderr is not a terminal progress is one line now and then.
"""
from __future__ import annotations

import datetime
import sys
import time

LOG_EVERY_S = 30.0  # seconds between progress lines in a log


class LogProgress:
    """The part of tqdm's interface the stages use, written as plain lines: the first update, then at most one
    line per LOG_EVERY_S, and a last one on close."""

    def __init__(self, stage: str, total: int | None, unit: str = "row", file=None):
        self.stage, self.total, self.unit, self.file = stage, total, unit, file or sys.stderr
        self.n, self.postfix, self.closed = 0, "", False
        self.start = time.monotonic()
        self.last_line: float | None = None

    def set_postfix_str(self, text: str = "", refresh: bool = True) -> None:
        self.postfix = text

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.last_line is None or time.monotonic() - self.last_line >= LOG_EVERY_S:
            self._line()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._line(done=True)

    def _line(self, done: bool = False) -> None:
        now = time.monotonic()
        self.last_line = now
        elapsed = now - self.start
        rate = self.n / elapsed if elapsed > 0 else 0.0
        count = f"{self.n}/{self.total}" if self.total is not None else f"{self.n}"
        parts = [f"[{self.stage}] {count} {self.unit}s"]
        if self.total:
            parts[0] += f" ({100 * self.n // self.total}%)"
        parts.append(f"{rate:.1f} {self.unit}s/s")
        if done:
            parts.append(f"done in {_clock(elapsed)}")
        elif self.total and rate > 0:
            parts.append(f"{_clock((self.total - self.n) / rate)} left")
        if self.postfix:
            parts.append(self.postfix)
        print(", ".join(parts), file=self.file, flush=True)


def _clock(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(seconds)))


def bar(stage: str, total: int | None, unit: str = "row"):
    if not sys.stderr.isatty():
        return LogProgress(stage, total, unit)
    from tqdm import tqdm

    return tqdm(total=total, desc=f"[{stage}]", unit=unit, file=sys.stderr, mininterval=0.5, dynamic_ncols=True)
