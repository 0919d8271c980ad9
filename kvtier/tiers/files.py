"""How the disk tier and its journal touch the file system: safely, whoever else writes there.

A directory kvtier shares with other processes (other engines, a writer child) may hold
anything its writers put there. Files are therefore opened never through a symbolic link
(whoever can write the directory could otherwise make kvtier write any file its user can),
never blocking (a FIFO named like a chunk would block a plain ``open``, and every lookup after
it, forever), and only when they are regular files.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from pathlib import Path

_OPEN = os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
USAGE_FILE = ".kvtier-usage"


def open_file(path: str, flags: int = os.O_RDONLY, mode: int = 0o644) -> int:
    """A descriptor of ``path`` if it is a regular file (no link followed, never blocking);
    OSError otherwise. ``O_NONBLOCK`` has no effect on a regular file's reads and writes."""
    fd = os.open(path, flags | _OPEN, mode)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", path)
    except OSError:
        os.close(fd)
        raise
    return fd


def unlink(path: str) -> bool:
    """Remove ``path``; True if this call removed it."""
    try:
        os.unlink(path)
        return True
    except OSError:
        return False


def write_all(fd: int, parts: list) -> None:
    """``writev`` all of ``parts``, continuing after short writes."""
    views = [memoryview(p) for p in parts]
    while views:
        n = os.writev(fd, views)
        if n == 0:
            raise OSError(errno.ENOSPC, "no progress writing chunk")
        while views and n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        if n:
            views[0] = views[0][n:]


class SharedUsage:
    """Bytes of chunk files in a directory, shared by every process using it (one 8-byte file,
    updated under ``flock``), so several processes on one ``disk_path`` keep one cap.

    Each process adds what it writes (at reservation) and subtracts what it removes itself;
    a file another process removed is only forgotten. A process starting up sets it to the
    bytes it found. The file is opened per update (no descriptor held: a file system can
    still be remounted read-only); when it cannot be updated, callers count locally.
    """

    def __init__(self, root: Path) -> None:
        self.path = root / USAGE_FILE

    def _update(self, fn) -> int | None:
        try:
            fd = open_file(str(self.path), os.O_RDWR | os.O_CREAT)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            raw = os.pread(fd, 8, 0)
            total = max(0, fn(int.from_bytes(raw, "little", signed=True) if len(raw) == 8 else 0))
            os.pwrite(fd, total.to_bytes(8, "little", signed=True), 0)
            return total
        except OSError:
            return None
        finally:
            os.close(fd)  # releases the lock

    def add(self, delta: int) -> int | None:
        """Add ``delta`` bytes; the new total, or None if the shared count cannot be updated."""
        return self._update(lambda total: total + delta)

    def set(self, total: int) -> None:
        self._update(lambda _: total)
