"""The disk tier's journal: which chunk files the processes sharing a directory wrote.

vLLM's scheduler and worker are separate processes with a disk tier each on one directory
(and several engines may share one): the worker writes chunks, the scheduler looks them up.
Without a journal the looking-up process would have to ``stat()`` every key it does not
know, on every lookup of a prompt nobody cached (1.4 ms for a 128K-token prompt, issue 17.2).
With it, a lookup costs one ``stat()`` of the journal whatever the number of keys: every
writer appends a record per chunk file it renamed into place, and every reader reads the
records appended since its last look.

Records are fixed-size (``RECORD`` bytes: key length, key, file size) and written with
``O_APPEND`` in one ``write``, so records of concurrent writers never interleave. When
the journal outgrows ``MAX_BYTES`` the writer that noticed replaces it with a file that
holds only its generation (the old one's plus one); a reader finishes the old file (its
open descriptor still reads it) before it follows the new one. A reader that slept
through a whole generation has lost records: it says so (``gap``) and its tier falls back
to a ``stat()`` per unknown key. A record lost in a race (written to the old file after a
reader left it, or between two writers rotating at once) costs a cache miss on that
chunk, never a wrong answer: a key the journal does not mention is not held by this reader.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

JOURNAL_FILE = ".kvtier-journal"
MAX_KEY = 32
RECORD = 1 + MAX_KEY + 8  # key length, key (zero-padded), file size
MAX_BYTES = RECORD * (1 << 18)  # ~10 MiB: 262,144 records


def _encode(key: bytes, size: int) -> bytes:
    return bytes([len(key)]) + key.ljust(MAX_KEY, b"\0") + size.to_bytes(8, "little")


def _generation(fd: int) -> int:
    """The generation a journal file starts with (a record with an empty key); 0 if none."""
    head = os.pread(fd, RECORD, 0)
    return int.from_bytes(head[1 + MAX_KEY:], "little") if len(head) == RECORD and head[0] == 0 else 0


class Journal:
    """Append records of chunk files written; read back those written since the last read."""

    def __init__(self, root: Path) -> None:
        self.path = str(root / JOURNAL_FILE)
        self._fd: int | None = None  # the journal file being read
        self._ino = -1
        self._pos = 0  # bytes of whole records read from it
        self._gen = 0  # its generation
        self.gap = False  # records were lost to rotations while we did not read: stat() unknown keys

    def skip_to_end(self) -> None:
        """Start reading at the records appended from now on (the directory scan covers older ones)."""
        self._open_current()
        if self._fd is not None:
            self._pos = os.fstat(self._fd).st_size // RECORD * RECORD

    def append(self, key: bytes, size: int) -> None:
        """Record that the chunk file of ``key`` (``size`` bytes) is in place. Best effort."""
        if len(key) > MAX_KEY:
            return  # never looked up by a reader that is not its writer
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError:
            return
        try:
            os.write(fd, _encode(key, size))
            end = os.lseek(fd, 0, os.SEEK_CUR)
        except OSError:
            return
        finally:
            os.close(fd)
        if end >= MAX_BYTES:
            self._rotate()

    def _rotate(self) -> None:
        tmp = f"{self.path}.{os.getpid()}"
        try:
            fd = os.open(self.path, os.O_RDONLY)
            try:
                gen = _generation(fd)
            finally:
                os.close(fd)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.write(fd, _encode(b"", gen + 1))
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
        except OSError:
            pass

    def read_new(self) -> Iterator[tuple[bytes, int]]:
        """(key, file size) of each record appended since the last call."""
        try:
            st = os.stat(self.path)
        except OSError:
            return
        if self._fd is not None and st.st_ino == self._ino and st.st_size < self._pos + RECORD:
            return  # the common case: nothing new, one stat()
        if self._fd is not None:
            yield from self._drain()  # the rest of the file (rotated or not)
            if st.st_ino == self._ino:
                return
        gen = self._gen
        self._open_current()
        if self._fd is not None and self._gen > gen + 1:
            self.gap = True
        yield from self._drain()

    def _open_current(self) -> None:
        self.close()
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return
        try:
            self._fd, self._ino, self._pos, self._gen = fd, os.fstat(fd).st_ino, 0, _generation(fd)
        except OSError:  # never leak the descriptor
            os.close(fd)
            self._fd = None

    def _drain(self) -> Iterator[tuple[bytes, int]]:
        try:
            data = os.pread(self._fd, 1 << 24, self._pos)
        except OSError:
            return
        whole = len(data) // RECORD * RECORD  # a record being appended right now waits for the next read
        self._pos += whole
        for i in range(0, whole, RECORD):
            n = data[i]
            if 0 < n <= MAX_KEY:
                yield bytes(data[i + 1:i + 1 + n]), int.from_bytes(data[i + 1 + MAX_KEY:i + RECORD], "little")

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
