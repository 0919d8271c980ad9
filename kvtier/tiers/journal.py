"""The disk tier's journal: which chunk files the processes sharing a directory wrote.

vLLM's scheduler and worker are separate processes with a disk tier each on one directory
(and several engines may share one): the worker writes chunks, the scheduler looks them up.
Without a journal the looking-up process would have to ``stat()`` every key it does not
know, on every lookup of a prompt nobody cached (1.4 ms for a 128K-token prompt, issue 17.2).
With it, a lookup costs one ``stat()`` of the journal whatever the number of keys: every
writer appends a record per chunk file it renamed into place, and every reader reads the
records appended since its last look.

Records are fixed-size (``RECORD`` bytes: magic, key length, key, file size, the writing
journal's random id, CRC-32 of what precedes it) and written with ``O_APPEND`` in one ``write``, so records of concurrent writers
never interleave. A record can still be torn (a short write on a full file system, a forged
edit): a reader that finds no valid record where it expects one skips forward to the next
position that holds one (the magic and the checksum), so one bad record costs only itself,
never the records after it (issue 29.2). When the journal outgrows ``MAX_BYTES`` the writer
that noticed replaces it with a file that holds only its generation (the old one's plus
one); a reader finishes the old file (its open descriptor still reads it) before it follows
the new one. A reader that slept through a whole generation, or that finds more than
``MAX_BYTES`` unread (a forged or sparse file), has lost records: it says so (``gap``) and
its tier falls back to a ``stat()`` per unknown key. A record lost in a race (written to the
old file after a reader left it, or between two writers rotating at once) costs a cache miss
on that chunk, never a wrong answer: a key the journal does not mention is not held by this
reader.

The journal is opened like chunk files: never through a symbolic link (whoever can write the
directory could otherwise make kvtier append to any file its user can write), never blocking
on a FIFO, and only when it is a regular file.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Iterator
from pathlib import Path

from kvtier.tiers.files import open_file

JOURNAL_FILE = ".kvtier-journal"
MAX_KEY = 32
MAGIC = b"\xc5\x4b"  # starts every record: where a reader resynchronizes after a torn one
_BODY = len(MAGIC) + 1 + MAX_KEY + 8 + 4  # magic, key length, key (zero-padded), file size, writer id
RECORD = _BODY + 4  # ... then the CRC-32 of the body
MAX_BYTES = RECORD * (1 << 18)  # ~12 MiB: 262,144 records


def _encode(key: bytes, size: int, origin: int = 0) -> bytes:
    body = (MAGIC + bytes([len(key)]) + key.ljust(MAX_KEY, b"\0") + size.to_bytes(8, "little")
            + origin.to_bytes(4, "little"))
    return body + zlib.crc32(body).to_bytes(4, "little")


def _decode(rec: bytes | memoryview) -> tuple[bytes, int, int] | None:
    """(key, size, writer id) of a whole, valid record; None when it is not one."""
    if len(rec) != RECORD or rec[:2] != MAGIC or zlib.crc32(rec[:_BODY]) != int.from_bytes(rec[_BODY:], "little"):
        return None
    n = rec[2]
    if n > MAX_KEY:
        return None
    end = 3 + MAX_KEY + 8
    return bytes(rec[3:3 + n]), int.from_bytes(rec[3 + MAX_KEY:end], "little"), int.from_bytes(rec[end:_BODY], "little")


def parse(data: bytes, end_is_final: bool = False) -> tuple[list[tuple[bytes, int, int]], int]:
    """The valid records in ``data`` and the bytes consumed: invalid bytes are skipped up to the
    next valid record; a tail too short to be judged (a record being appended right now) is
    left for the next read unless ``end_is_final``."""
    out: list[tuple[bytes, int]] = []
    pos, n = 0, len(data)
    while pos < n:
        if pos + RECORD > n:  # maybe a record still being written: wait, unless it cannot be one
            if end_is_final or not MAGIC.startswith(data[pos:pos + len(MAGIC)]):
                nxt = data.find(MAGIC[:1], pos + 1)
                pos = n if nxt < 0 else nxt
                continue
            break
        rec = _decode(data[pos:pos + RECORD])
        if rec is not None:
            out.append(rec)
            pos += RECORD
            continue
        nxt = data.find(MAGIC, pos + 1)  # torn or forged: resynchronize on the next magic
        if nxt < 0:  # none whole: keep a tail that may still start one
            nxt = max(pos + 1, n - len(MAGIC) + 1)
        pos = nxt
    return out, pos


def _generation(fd: int) -> int:
    """The generation a journal file starts with (a record with an empty key); 0 if none."""
    rec = _decode(os.pread(fd, RECORD, 0))
    return rec[1] if rec is not None and rec[0] == b"" else 0


def _new_origin() -> int:
    return int.from_bytes(os.urandom(4), "little") or 1  # 0: generation records


class Journal:
    """Append records of chunk files written; read back those written since the last read."""

    def __init__(self, root: Path) -> None:
        self.path = str(root / JOURNAL_FILE)
        self._fd: int | None = None  # the journal file being read
        self._ino = -1
        self._pos = 0  # bytes read (and judged) from it
        self._gen = 0  # its generation
        self.gap = False  # records were lost (rotations while we did not read): stat() unknown keys
        self.gaps = 0  # times that happened (the tier forgets what it learned from stat() then)
        self.torn = 0  # short writes of our own appends (a full file system)
        # Our records are skipped when read back: the tier indexed them when it wrote them, and
        # one read after a later removal of the same key would index a file that is gone.
        self.origin = _new_origin()

    def skip_to_end(self) -> None:
        """Start reading at the records appended from now on (the directory scan covers older ones)."""
        self._open_current()
        if self._fd is not None:
            self._pos = os.fstat(self._fd).st_size

    def append(self, key: bytes, size: int) -> None:
        """Record that the chunk file of ``key`` (``size`` bytes) is in place. Best effort."""
        if len(key) > MAX_KEY:
            return  # never looked up by a reader that is not its writer
        rec = _encode(key, size, self.origin)
        try:
            fd = open_file(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        except OSError:
            return
        try:
            if os.write(fd, rec) < len(rec):
                self.torn += 1  # readers skip the torn bytes (parse); the record is lost
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
            fd = open_file(self.path, os.O_RDONLY)
            try:
                gen = _generation(fd)
            finally:
                os.close(fd)
            try:
                os.unlink(tmp)  # whatever sits under our temp name (a link, a leftover): not followed
            except FileNotFoundError:
                pass
            fd = open_file(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
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
            st = os.stat(self.path, follow_symlinks=False)
        except OSError:
            return
        if self._fd is not None and st.st_ino == self._ino and st.st_size < self._pos + RECORD:
            return  # the common case: nothing new, one stat()
        if self._fd is not None:
            yield from self._drain(final=st.st_ino != self._ino)  # the rest of the file (rotated or not)
            if st.st_ino == self._ino:
                return
        gen = self._gen
        self._open_current()
        if self._fd is not None and self._gen > gen + 1:
            self._lost()
        yield from self._drain()

    def _lost(self) -> None:
        self.gap = True
        self.gaps += 1

    def _open_current(self) -> None:
        self.close()
        try:
            fd = open_file(self.path, os.O_RDONLY)
        except OSError:
            return
        try:
            self._fd, self._ino, self._pos, self._gen = fd, os.fstat(fd).st_ino, 0, _generation(fd)
        except OSError:  # never leak the descriptor
            os.close(fd)
            self._fd = None

    def _drain(self, final: bool = False) -> Iterator[tuple[bytes, int]]:
        """The records of the open file from where we are; ``final``: it was replaced, so what
        it ends with is never completed."""
        if self._fd is None:  # vanished (or replaced by a non-file) between our stat() and open()
            return
        try:
            size = os.fstat(self._fd).st_size
            if size - self._pos > MAX_BYTES + RECORD:  # far more than any writer appends: forged or sparse
                self._pos = size  # reading it would cost each lookup up to a second under the tier's lock
                self._lost()
                return
            data = os.pread(self._fd, size - self._pos, self._pos)
        except OSError:
            return
        records, used = parse(data, end_is_final=final)
        self._pos += used
        for key, size, origin in records:
            if key and origin != self.origin:  # an empty key is a generation record
                yield key, size

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
