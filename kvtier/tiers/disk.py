"""The disk tier: one file per chunk under a directory, size-capped with LRU eviction.

Layout on disk: ``<path>/<first key byte as 2 hex>/<key hex>.kvc``, each file the
256-byte header of :mod:`kvtier.layout` followed by the payload. The 256-way fan-out
keeps every directory small (64 GiB of 256 KiB chunks is ~1000 files per directory)
while costing one ``mkdir`` per subdirectory over the tier's whole life.

Writes are atomic: the chunk goes to a temp file in the same subdirectory, which
``os.replace`` then renames over the final name, so a reader sees either the whole
old file or the whole new one, never a partial one. There is no ``fsync``: the tier
is a cache, every file carries its size and checksum, so what a power loss leaves
torn is detected on read (a miss, counted, removed); an fsync per 32 MiB chunk would
cost more than the write itself.

The index (key -> file size, in LRU order) lives in memory and is rebuilt from the
directory on start (oldest mtime first; a hit refreshes the file's mtime so recency
survives a restart). Leftover temp files of an earlier run are removed then. When the
cap shrank since the last run, the oldest entries leave the index at once and a
background thread removes their files: the tier serves while it trims. Chunks other
processes write to the same directory later are learned from its journal
(:mod:`kvtier.tiers.journal`), so a lookup miss never touches the file system.

Reads go straight into the caller's buffer and are checked on the way: the payload
is read in pieces and each piece is hashed while it is still in the CPU cache, which
makes the checksum nearly free next to the read itself.
"""

from __future__ import annotations

import errno
import fcntl
import itertools
import logging
import os
import stat
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import xxhash

from kvtier.config import ConfigError
from kvtier.layout import HEADER_SIZE, ChunkLayout, CorruptChunk, decode_header, encode_header
from kvtier.tiers.base import Buffer, Protected, StoredChunk, Tier, TierStats, lru_victim, never_protected
from kvtier.tiers.journal import Journal

log = logging.getLogger(__name__)

USAGE_FILE = ".kvtier-usage"
SUFFIX = ".kvc"
TMP_PREFIX = ".tmp-"
# Payload bytes read (and hashed) per step: small enough to stay in L2 while hashed.
# Measured on 32 MiB chunks from the page cache (2-core box): 1 MiB pieces hashed inline
# read at 0.90 of a bare readinto; 4 MiB pieces hashed on a helper thread at 0.86.
_READ_PIECE = 1024 * 1024
# The payload starts on a page boundary: the header, then zeros up to 4 KiB. Copies out
# of the page cache are then page-aligned (an unaligned file offset reads ~15% slower).
DATA_OFFSET = 4096
_PAD = bytes(DATA_OFFSET - HEADER_SIZE)


def as_bytes(buf: Buffer) -> memoryview:
    """A flat, byte-typed view of ``buf`` (no copy)."""
    if isinstance(buf, np.ndarray):
        return memoryview(buf.reshape(-1).view(np.uint8))
    mv = memoryview(buf)
    return mv if mv.format == "B" and mv.ndim == 1 else mv.cast("B")


class DiskTier(Tier):
    name = "disk"

    def __init__(self, path: str | Path, capacity_bytes: int, layout: ChunkLayout, label: str = "",
                 protected: Protected = never_protected) -> None:
        self.root = Path(path)
        self.capacity = int(capacity_bytes)
        self.layout = layout
        self.label = label
        self.protected = protected
        self.file_bytes = DATA_OFFSET + layout.nbytes
        self._lock = threading.Lock()
        self._index: OrderedDict[bytes, int] = OrderedDict()  # key -> file size, oldest first
        self._used = 0  # bytes of indexed files plus space reserved by writes in flight
        self._stored = 0  # bytes of indexed files
        self._made_dirs: set[str] = set()
        self._failing = False  # the last put failed (log once per failing spell)
        self._tmp_ids = itertools.count()
        self._stats = TierStats("disk", capacity_bytes=self.capacity)
        self._trimmer: threading.Thread | None = None
        self._closed = False
        self._check_dir()
        self._usage = _SharedUsage(self.root)
        self._journal = Journal(self.root)
        self._journal.skip_to_end()  # what is older, the scan finds
        self._rebuild()

    # ---- start-up -------------------------------------------------------------------------
    def _check_dir(self) -> None:
        fix = "set disk_path to a writable directory (or fix its permissions / mount)"
        if self.root.exists() and not self.root.is_dir():
            raise ConfigError(f"disk_path={str(self.root)!r}: exists and is not a directory; {fix}")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"disk_path={str(self.root)!r}: cannot create the directory "
                              f"({e.strerror or e}); {fix}") from e
        if not self.root.is_dir():
            raise ConfigError(f"disk_path={str(self.root)!r}: exists and is not a directory; {fix}")
        probe = self.root / f"{TMP_PREFIX}probe-{os.getpid()}"
        try:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.write(fd, b"kvtier")
            finally:
                os.close(fd)
            os.unlink(probe)
        except OSError as e:
            raise ConfigError(f"disk_path={str(self.root)!r}: directory is not writable "
                              f"({e.strerror or e}); {fix}") from e
        if self.capacity < self.file_bytes:
            raise ConfigError(f"disk_bytes={self.capacity}: holds no chunk of {self.file_bytes} bytes; "
                              f"raise disk_bytes (better: to hundreds of chunks)")

    def _rebuild(self) -> None:
        found: list[tuple[int, bytes, int]] = []
        for sub in os.scandir(self.root):
            if sub.name.startswith(TMP_PREFIX) and sub.is_file(follow_symlinks=False):
                _unlink(sub.path)
                continue
            if not sub.is_dir(follow_symlinks=False) or len(sub.name) != 2:
                continue
            self._made_dirs.add(sub.name)
            for entry in os.scandir(sub.path):
                if entry.name.startswith(TMP_PREFIX):
                    _unlink(entry.path)
                    continue
                if not entry.name.endswith(SUFFIX):
                    continue
                try:
                    key = bytes.fromhex(entry.name[:-len(SUFFIX)])
                    st = entry.stat(follow_symlinks=False)
                except (ValueError, OSError):
                    continue
                if not stat.S_ISREG(st.st_mode):
                    continue  # a FIFO, socket or link named like a chunk is never ours
                found.append((st.st_mtime_ns, key, st.st_size))
        found.sort()
        for _, key, size in found:
            self._index[key] = size
            self._used += size
            self._stored += size
        # The cap may have shrunk since the last run: serve now, remove the files behind.
        victims = []
        while self._used > self.capacity:
            victim = lru_victim(self._index, self.protected)
            if victim is None:
                break
            self._drop(victim)
            victims.append(victim)
        self._usage.set(self._stored)
        if victims:
            self._trimmer = threading.Thread(target=self._trim, args=(victims,), name="kvtier-disk-trim",
                                             daemon=True)
            self._trimmer.start()

    def _trim(self, victims: list[bytes]) -> None:
        """Remove the files of ``victims`` (already out of the index and the shared count),
        except those put again since."""
        for key in victims:
            with self._lock:
                if self._closed:
                    return
                if key in self._index:
                    continue
                if _unlink(self._path(key)):
                    self._journal.append(key, 0)
                self._stats.evictions += 1

    def wait_trimmed(self, timeout: float | None = None) -> bool:
        """Wait until the files over a shrunk cap are removed; False on timeout."""
        if self._trimmer is not None:
            self._trimmer.join(timeout)
            return not self._trimmer.is_alive()
        return True

    # ---- paths ------------------------------------------------------------------------------
    def _path(self, key: bytes) -> str:
        h = key.hex()
        return os.path.join(self.root, h[:2], h + SUFFIX)

    def _subdir(self, key: bytes) -> str:
        sub = key[:1].hex()
        d = os.path.join(self.root, sub)
        if sub not in self._made_dirs:
            os.makedirs(d, exist_ok=True)
            self._made_dirs.add(sub)
        return d

    # ---- space ----------------------------------------------------------------------------
    def _reserve(self, size: int) -> bool:
        """Make room for ``size`` bytes under the cap shared by every process on this directory
        (evicting this process's LRU unprotected chunks); lock held."""
        shared = self._usage.add(size)
        total = self._used + size if shared is None else shared
        while total > self.capacity:
            k = lru_victim(self._index, self.protected)
            if k is None:
                break
            removed, now = self._index.get(k, 0), self._remove(k)
            total = total - removed if shared is None else (total if now is None else now)
            self._stats.evictions += 1
        if total > self.capacity:
            if shared is not None:
                self._usage.add(-size)
            return False
        self._used += size
        return True

    def _remove(self, key: bytes) -> int | None:
        """Forget ``key`` and remove its file; the shared total if this call removed it (lock held)."""
        size = self._index.get(key, 0)
        self._drop(key)
        if not _unlink(self._path(key)):
            return None
        self._journal.append(key, 0)
        return self._usage.add(-size)

    # ---- Tier -----------------------------------------------------------------------------
    def contains(self, keys: Sequence[bytes]) -> list[bool]:
        self._catch_up(keys)
        index = self._index
        return [k in index for k in keys]

    def _catch_up(self, keys: Sequence[bytes]) -> None:
        """Index the chunk files that other processes (an engine's worker, another engine) wrote
        here since we last looked, and forget those they removed, as their journal says: a
        directory shared by several processes is how they share chunks. One ``stat()`` when
        nothing is new. Each process keeps its own account of the cap."""
        with self._lock:
            for key, size in self._journal.read_new():
                if size == 0:  # removed, unless written again since (a file we wrote stays ours)
                    if key in self._index and not os.path.lexists(self._path(key)):
                        self._drop(key)
                else:
                    self._adopt(key, size)
            if not self._journal.gap:
                return
            for key in keys:  # records were lost: ask the file system about each unknown key
                if key not in self._index:
                    try:
                        st = os.stat(self._path(key), follow_symlinks=False)
                    except OSError:
                        continue
                    if stat.S_ISREG(st.st_mode):
                        self._adopt(key, st.st_size)

    def _adopt(self, key: bytes, size: int) -> None:
        """Index a chunk file another process wrote (lock held)."""
        if size == self.file_bytes and key not in self._index:  # another layout's is not ours
            self._index[key] = size
            self._index.move_to_end(key, last=False)  # never read here: first to go
            self._used += size
            self._stored += size

    def put(self, keys: Sequence[bytes], payloads: Sequence[Buffer]) -> list[bool]:
        return [self._put_one(k, p) for k, p in zip(keys, payloads, strict=True)]

    def _put_one(self, key: bytes, payload: Buffer) -> bool:
        data = as_bytes(payload)
        if len(data) != self.layout.nbytes:
            raise ValueError(f"payload of {len(data)} bytes, the layout needs {self.layout.nbytes}")
        size = self.file_bytes
        with self._lock:
            if not self._reserve(size):
                self._stats.errors += 1
                return False
        tmp = None
        try:
            header = encode_header(key, self.layout, data, self.label)
            d = self._subdir(key)
            tmp = os.path.join(d, f"{TMP_PREFIX}{os.getpid()}-{next(self._tmp_ids)}")
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileNotFoundError:  # the directory was removed behind our back: make it again
                self._made_dirs.discard(key[:1].hex())
                self._subdir(key)
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                _write_all(fd, [header, _PAD, data])
            finally:
                os.close(fd)
            with self._lock:
                replaced = os.path.lexists(self._path(key))
                os.replace(tmp, self._path(key))
                tmp = None
                if replaced:  # the old file's bytes are gone, whoever had counted them
                    self._usage.add(-size)
                self._drop(key)
                self._index[key] = size
                self._stored += size
                self._stats.puts += 1
                self._stats.bytes_written += size
                self._failing = False
            self._journal.append(key, size)
            return True
        except OSError as e:
            with self._lock:
                self._used -= size
                self._usage.add(-size)
                self._stats.errors += 1
                warn, self._failing = not self._failing, True
            if warn:
                log.warning("disk tier: cannot write under %s (%s); chunks are not stored there until it works",
                            self.root, e.strerror or e)
            if tmp is not None:
                _unlink(tmp)
            self._made_dirs.discard(key[:1].hex())
            return False

    def get_into(self, keys: Sequence[bytes], dests: Sequence[Buffer]) -> list[bool]:
        self._catch_up(keys)
        return [self._get_one(k, d) for k, d in zip(keys, dests, strict=True)]

    def _get_one(self, key: bytes, dest: Buffer) -> bool:
        out = as_bytes(dest)
        if len(out) != self.layout.nbytes:
            raise ValueError(f"destination of {len(out)} bytes, the layout needs {self.layout.nbytes}")
        if key not in self._index:
            with self._lock:
                self._stats.misses += 1
            return False
        path = self._path(key)
        try:
            fd = open_regular(path)
        except OSError as e:  # vanished, or not a regular file (never ours): forgotten
            self._forget(key, None, error=e.errno not in (errno.ENOENT, errno.EINVAL, errno.ELOOP))
            return False
        st = None
        try:
            st = os.fstat(fd)
            self._read_checked(fd, key, out, st.st_size)
        except CorruptChunk:
            self._forget(key, st, corrupt=True)
            return False
        except OSError:
            self._forget(key, None, error=True)
            return False
        finally:
            os.close(fd)
        with self._lock:
            if key in self._index:
                self._index.move_to_end(key)
            self._stats.hits += 1
            self._stats.bytes_read += st.st_size
        try:
            os.utime(path)  # recency for the index rebuilt after a restart
        except OSError:
            pass
        return True

    def _read_checked(self, fd: int, key: bytes, out: memoryview, file_size: int) -> None:
        """Read the chunk of ``fd`` into ``out``, raising CorruptChunk unless it is exactly right.

        The checksum is the header's xxh3-64 of the payload (:func:`kvtier.layout.checksum`),
        computed piece by piece as each piece lands in ``out``.
        """
        head = bytearray(HEADER_SIZE)
        if os.preadv(fd, [head], 0) < HEADER_SIZE:
            raise CorruptChunk(f"file truncated ({file_size} bytes)")
        header = decode_header(head)
        if header.key != key:
            raise CorruptChunk("chunk stored under another key")
        if header.layout != self.layout:
            raise CorruptChunk(f"layout {header.layout.describe()} differs from expected {self.layout.describe()}")
        if file_size != DATA_OFFSET + header.nbytes:
            raise CorruptChunk(f"file of {file_size} bytes, expected {DATA_OFFSET + header.nbytes}")
        h = xxhash.xxh3_64()
        n = len(out)
        pos = 0
        while pos < n:
            k = os.preadv(fd, [out[pos:pos + _READ_PIECE]], DATA_OFFSET + pos)
            if k <= 0:
                raise CorruptChunk(f"payload truncated ({pos} of {n} bytes)")
            h.update(out[pos:pos + k])  # while the piece is still in the CPU cache
            pos += k
        if h.intdigest() != header.checksum:
            raise CorruptChunk("checksum mismatch")

    def _forget(self, key: bytes, st: os.stat_result | None, corrupt: bool = False, error: bool = False) -> None:
        """Account a failed read of ``key``.

        A corrupt file is removed (only if it is still the file we read, ``st``: a concurrent
        put may have replaced it with a good one) and forgotten; a vanished file is forgotten;
        after an I/O error the entry is kept (the error may pass).
        """
        path = self._path(key)
        with self._lock:
            self._stats.misses += 1
            self._stats.corrupt += corrupt
            self._stats.errors += error
            if error:
                return
            if corrupt and st is not None:
                try:
                    now = os.stat(path)
                except OSError:
                    now = None
                if now is not None and (now.st_ino, now.st_dev) != (st.st_ino, st.st_dev):
                    return
                self._remove(key)
                return
            self._drop(key)

    def _drop(self, key: bytes) -> None:
        """Remove ``key`` from the index (lock held)."""
        size = self._index.pop(key, None)
        if size is not None:
            self._used -= size
            self._stored -= size

    def delete(self, keys: Sequence[bytes]) -> None:
        with self._lock:
            for k in keys:
                if k in self._index:
                    self._remove(k)

    def stats(self) -> TierStats:
        with self._lock:
            self._stats.chunks = len(self._index)
            self._stats.bytes = self._stored
        return self._stats

    def scan(self) -> Iterator[StoredChunk]:
        with self._lock:
            keys = list(self._index)
        for k in keys:
            try:
                with open(open_regular(self._path(k)), "rb", buffering=0) as f:
                    header = decode_header(f.read(HEADER_SIZE))
            except (OSError, CorruptChunk):
                continue
            yield StoredChunk(k, header.nbytes, header.label)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._journal.close()
            self._index.clear()
            self._used = self._stored = 0


def _write_all(fd: int, parts: list) -> None:
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


class _SharedUsage:
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
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
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


def _unlink(path: str) -> bool:
    """Remove ``path``; True if this call removed it."""
    try:
        os.unlink(path)
        return True
    except OSError:
        return False


def open_regular(path: str) -> int:
    """A read-only fd of ``path`` if it is a regular file; OSError otherwise.

    Never blocks: a FIFO or device named like a chunk would block a plain open (and every
    lookup after it) forever; ``O_NONBLOCK`` has no effect on a regular file's reads.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file", path)
    return fd
