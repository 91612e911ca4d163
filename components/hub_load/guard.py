"""Reading only what hub_load was pointed at: files whose real path is inside the source's root, regular files
only, never more than hub_load.max_file_bytes of any one of them.

A symlink in a seed folder (or a `path` in a Hugging Face row) can name any file of the machine: a service
account's token, /dev/zero, a FIFO that blocks forever. What cannot be read is refused with a reason, and the
stage rejects that row (or drops that caption) instead of reading it.
"""
from __future__ import annotations

import os
import re
import stat

import fsspec

# `gs://…`, `http://…`, `file:…`, `data:…` and fsspec's chained `zip::…` (a one-letter scheme is a drive letter)
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]+:|::")


class Refused(Exception):
    """A file hub_load will not read; `reason` becomes the row's rejection reason, `detail` says why."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def is_url(path: str) -> bool:
    return bool(_URL.search(path))


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    return "file" in protocols or "local" in protocols


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def _too_large(path: str, cap: int, size: int | None = None) -> Refused:
    held = f"{size} bytes" if size is not None else f"more than {cap} bytes"
    return Refused("file_too_large", f"{path} holds {held}, over hub_load.max_file_bytes = {cap}")


def read_local(path: str, root: str, cap: int) -> bytes:
    """At most `cap` bytes of the local file `path`, if its real path (symlinks and `..` resolved) is inside
    `root` (itself a real path) and it is a regular file. The file is checked before it is opened (opening a
    device can have effects), opened non-blocking (a FIFO swapped in meanwhile cannot hang us) and checked again."""
    real = os.path.realpath(path)
    if os.path.commonpath([real, root]) != root:
        raise Refused("outside_source", f"{path} resolves to {real}, outside the source root {root}")
    try:
        mode = os.stat(real).st_mode
    except FileNotFoundError:
        raise Refused("not_a_regular_file", f"{path} names no file (a dangling link, or removed)") from None
    if not stat.S_ISREG(mode):
        raise Refused("not_a_regular_file", f"{path} is {_kind(mode)}")
    fd = os.open(real, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb") as f:
        mode = os.fstat(f.fileno()).st_mode
        if not stat.S_ISREG(mode):
            raise Refused("not_a_regular_file", f"{path} is {_kind(mode)}")
        data = f.read(cap + 1)
    if len(data) > cap:
        raise _too_large(path, cap)
    return data


def read_object(fs: fsspec.AbstractFileSystem, path: str, size: int | None, cap: int) -> bytes:
    """At most `cap` bytes of an object-store file: refused by the listing's size before any read, and by what
    a read of `cap` + 1 bytes returns (the object may have grown since it was listed)."""
    if size is not None and size > cap:
        raise _too_large(path, cap, size)
    with fs.open(path, "rb") as f:
        data = f.read(cap + 1)
    if len(data) > cap:
        raise _too_large(path, cap)
    return data
