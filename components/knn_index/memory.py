"""Peak resident memory of this process and its children, sampled in a thread (psutil), and memory sizes as
autofaiss writes them ("16G", "512MB")."""
from __future__ import annotations

import re
import threading

_UNITS = {"": 1, "B": 1, "K": 2**10, "KB": 2**10, "M": 2**20, "MB": 2**20, "G": 2**30, "GB": 2**30, "T": 2**40, "TB": 2**40}


def parse_size(text: str) -> int:
    """Bytes in "16G", "512MB", "1.5GB", "100B": the forms autofaiss's cast_memory_to_bytes takes (binary units)."""
    match = re.fullmatch(r"([0-9]*\.[0-9]+|[0-9]+)(B|[KMGT]B?)", str(text).upper())
    if not match:
        raise ValueError(f"{text!r} is not a memory size as autofaiss takes them: a number and a unit, like 16G, 512MB, 1.5GB")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def human(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024
    return f"{size:.1f} TiB"


class PeakMemory:
    """`with PeakMemory() as peak: ...; peak.bytes`: the largest RSS (this process plus its children) seen;
    peak.anon_bytes: the largest of its anonymous part (RSS less file-backed pages: libraries, memory-mapped inputs),
    what the build itself allocates."""

    def __init__(self, pid: int | None = None, every_s: float = 0.1):
        import psutil

        self.process = psutil.Process(pid)
        self.every_s, self.bytes, self.anon_bytes = every_s, 0, 0
        self.phase = "before"  # what the build is doing now (PhaseLog sets it from autofaiss's log)
        self.phases: dict[str, dict] = {}  # phase -> its peak RSS and anonymous bytes, in the order first seen
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def sample(self) -> int:
        import psutil

        total = anon = 0
        for proc in [self.process, *self.process.children(recursive=True)]:
            try:
                info = proc.memory_info()
            except psutil.Error:  # a child that ended between the listing and the read
                continue
            total += info.rss
            anon += info.rss - getattr(info, "shared", 0)  # Linux: shared = file-backed + shared memory pages
        self.bytes = max(self.bytes, total)
        self.anon_bytes = max(self.anon_bytes, anon)
        seen = self.phases.setdefault(self.phase, {"peak_rss_bytes": 0, "peak_anon_bytes": 0})
        seen["peak_rss_bytes"] = max(seen["peak_rss_bytes"], total)
        seen["peak_anon_bytes"] = max(seen["peak_anon_bytes"], anon)
        return total

    def enter(self, phase: str) -> None:
        """From now on samples count for `phase` (the one before sampled at the switch: a short phase is seen)."""
        self.sample()
        self.phase = phase

    def _watch(self) -> None:
        while not self._stop.wait(self.every_s):
            self.sample()

    def __enter__(self) -> "PeakMemory":
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


class PhaseLog:
    """A logging handler that tells a PeakMemory which of autofaiss's phases runs: autofaiss's Timeit logs each
    phase's comment and start date when it starts and '>>> Finished "<comment>"' when it ends (phases nest)."""

    _started = re.compile(r"^\t*(?:-> )?(.+?) \d\d/\d\d/\d{4}, \d\d:\d\d:\d\d$")
    _finished = re.compile(r'^\t*>>> Finished "(?:-> )?(.+?)" in ')

    def __init__(self, peak: PeakMemory):
        import logging

        self.handler = logging.Handler()
        self.handler.emit = self.emit
        self.peak, self.stack = peak, [peak.phase]

    def emit(self, record) -> None:
        message = record.getMessage()
        if match := self._started.match(message):
            self.stack.append(_short(match.group(1)))
        elif (match := self._finished.match(message)) and len(self.stack) > 1:
            self.stack.pop()
        else:
            return
        self.peak.enter(self.stack[-1])


def _short(phase: str) -> str:
    """autofaiss's phase comment without the index path and the vector counts that differ between builds."""
    phase = re.sub(r" \S*image\.index$", "", phase)
    return re.sub(r"^Training the index with \d+ vectors.*", "Training the index", phase)
