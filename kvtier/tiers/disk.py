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
is read in pieces and each piece is hashed as soon as it lands (while it is still in
the CPU cache when it came from the page cache), which makes the checksum nearly free
next to the read itself. A batch of chunks is read by a small pool of threads owned by
the tier, one chunk per thread: ``preadv`` and xxhash's ``update`` of a 1 MiB piece both
release the GIL, and one thread copies out of the page cache at a fraction of what the
machine can (3.4 GB/s of 40 on a 16-core host). A piece that is not in the page cache is
read with ``O_DIRECT`` straight into the destination when it is page-aligned (pinned host
memory is): the device's speed without a copy, and without filling the page cache with
a chunk that now lives in host memory.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path

import xxhash

from kvtier.config import ConfigError
from kvtier.layout import HEADER_SIZE, ChunkLayout, CorruptChunk, Header, decode_header, encode_header
from kvtier.tiers.base import (Buffer, Protected, StoredChunk, Tier, TierStats, as_bytes, lru_victim,
                               never_protected)
from kvtier.tiers.direct_reads import ALIGN, O_DIRECT, RWF_NOWAIT, DirectReads, address, resident_pages
from kvtier.tiers.files import USAGE_FILE, SharedUsage, open_file, unlink, write_all  # noqa: F401 - USAGE_FILE: for importers
from kvtier.tiers.journal import Journal

log = logging.getLogger(__name__)

SUFFIX = ".kvc"
TMP_PREFIX = ".tmp-"
# Payload bytes read (and hashed) per step: small enough to stay in L2 while hashed.
# Measured on 32 MiB chunks from the page cache (2-core box): 1 MiB pieces hashed inline
# read at 0.90 of a bare readinto; 4 MiB pieces hashed on a helper thread at 0.86.
# xxhash releases the GIL in every update: two threads hashing 1 MiB pieces ran 1.8x one
# (with 64 KiB pieces 0.85x: the GIL hand-offs around each call cost more than they free).
# With 2 and 8 reader threads, 1 MiB pieces still beat 2 and 4 MiB ones (by 2-6%).
_READ_PIECE = 1024 * 1024
# The payload starts on a page boundary: the header, then zeros up to 4 KiB. Copies out
# of the page cache are then page-aligned (an unaligned file offset reads ~15% slower).
DATA_OFFSET = 4096
_PAD = bytes(DATA_OFFSET - HEADER_SIZE)
# Candidates one eviction may pass over because another process read them (see DiskTier._victim).
_SECOND_CHANCES = 64
# Keys remembered absent after the journal lost records (~100 MB at most).
_MAX_ABSENT = 1 << 20


class DiskTier(Tier):
    name = "disk"

    def __init__(self, path: str | Path, capacity_bytes: int, layout: ChunkLayout, label: str = "",
                 protected: Protected = never_protected, read_threads: int = 8) -> None:
        """``read_threads``: threads reading the chunks of one ``get_into`` batch in parallel
        (1: the caller's thread reads them one after another)."""
        self.root = Path(path)
        self.capacity = int(capacity_bytes)
        self.layout = layout
        self.label = label
        self.protected = protected
        self.file_bytes = DATA_OFFSET + layout.nbytes
        self._lock = threading.Condition(threading.Lock())  # a Condition: puts wait out a trim's unlink
        self._trimming: bytes | None = None  # the key whose file the trim thread is unlinking now
        self._index: OrderedDict[bytes, int] = OrderedDict()  # key -> file size, oldest first
        # key -> the newest mtime (ns) we know its file had: a newer one on disk means another
        # process (the parent of a writer child) read it since: see _victim.
        self._seen: dict[bytes, int] = {}
        # Keys stat()ed absent since the journal last lost records (see _catch_up).
        self._absent: set[bytes] = set()
        self._absent_gaps = 0
        self._used = 0  # bytes of indexed files plus space reserved by writes in flight
        self._stored = 0  # bytes of indexed files
        self._made_dirs: set[str] = set()
        self._failing = False  # the last put failed (log once per failing spell)
        self._tmp_ids = itertools.count()
        self._stats = TierStats("disk", capacity_bytes=self.capacity)
        # Chunks read (in part) with O_DIRECT, and those bytes.
        self._stats.extra.update(direct_reads=0, direct_bytes=0)
        self.read_threads = max(1, int(read_threads))
        self._readers: ThreadPoolExecutor | None = None  # made at the first batch that needs it
        self._readers_pid = 0
        # Cleared for good when the file system or the kernel refuses them (tests clear them too).
        self.direct_io = bool(O_DIRECT)
        self.nowait_probe = bool(RWF_NOWAIT)
        self._trimmer: threading.Thread | None = None
        self._closed = False
        self._check_dir()
        self._usage = SharedUsage(self.root)
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
                unlink(sub.path)
                continue
            if not sub.is_dir(follow_symlinks=False) or len(sub.name) != 2:
                continue
            self._made_dirs.add(sub.name)
            for entry in os.scandir(sub.path):
                if entry.name.startswith(TMP_PREFIX):
                    unlink(entry.path)
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
        for mtime, key, size in found:
            self._index[key] = size
            self._seen[key] = mtime
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
                self._trimming = key  # a put of it now waits for this unlink (see _put_one)
            try:
                # Outside the lock: a 50K-file trim held it over each unlink (contains p99 3.7 ms).
                if unlink(self._path(key)):
                    self._journal.append(key, 0)
            finally:
                with self._lock:
                    self._trimming = None
                    self._stats.evictions += 1
                    self._lock.notify_all()

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
        if total > self.capacity:
            # Chunks other processes wrote count in the shared total: index them so they can be
            # evicted here too (a writer child never looks anything up, issue 29.4).
            self._apply_journal()
        while total > self.capacity:
            k = self._victim()
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

    def _victim(self) -> bytes | None:
        """The least recently used unprotected key, counting reads by other processes (lock held).

        With ``writer: process`` the engine's process reads and a child evicts: a read there
        refreshes the file's mtime (see _get_one), so a candidate whose file is newer than we
        knew was read elsewhere since: it moves to the recent end instead (issue 29.5). One
        ``stat()`` per candidate, next to the ``unlink()`` of an eviction.
        """
        for _ in range(min(len(self._index), _SECOND_CHANCES)):
            key = lru_victim(self._index, self.protected)
            if key is None:
                return None
            try:
                mtime = os.stat(self._path(key), follow_symlinks=False).st_mtime_ns
            except OSError:
                return key  # gone or unreadable: evict (forget) it first
            if mtime <= self._seen.get(key, 0):
                return key
            self._seen[key] = mtime
            self._index.move_to_end(key)
        return lru_victim(self._index, self.protected)

    def _remove(self, key: bytes) -> int | None:
        """Forget ``key`` and remove its file; the shared total if this call changed it (lock held)."""
        size = self._index.get(key, 0)
        self._drop(key)
        try:
            os.unlink(self._path(key))
        except FileNotFoundError:
            return self._vanished(key, size)
        except OSError:
            return None  # still there (its bytes still count): only out of our index
        self._journal.append(key, 0)
        return self._usage.add(-size)

    def _vanished(self, key: bytes, size: int) -> int | None:
        """``key``'s file (``size`` bytes) is gone and out of the index: take its bytes out of the
        shared count unless another kvtier process removed it (its journal record says so, and
        it took them out itself). Else files removed by hand stayed counted for good (issue 29.3).
        Lock held; the new shared total, or None when unchanged."""
        if size == 0 or key in self._apply_journal():
            return None
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
            self._apply_journal()
            if not self._journal.gap:
                return
            if self._absent_gaps != self._journal.gaps or len(self._absent) > _MAX_ABSENT:
                self._absent.clear()  # records lost again (or too many remembered): ask again
                self._absent_gaps = self._journal.gaps
            for key in keys:  # records were lost: ask the file system about each unknown key, once
                if key not in self._index and key not in self._absent:
                    try:
                        st = os.stat(self._path(key), follow_symlinks=False)
                    except OSError:
                        st = None
                    if st is not None and stat.S_ISREG(st.st_mode):
                        self._adopt(key, st.st_size)
                    else:
                        # A file written from now on is in the journal we read: no need to ask
                        # again (a 512-key miss cost 3.4-4.1 ms per lookup for good, else).
                        self._absent.add(key)

    def _apply_journal(self) -> set[bytes]:
        """Apply the journal's new records to the index (lock held); the keys others removed."""
        removed = set()
        for key, size in self._journal.read_new():
            self._absent.discard(key)
            if size == 0:  # removed, unless written again since (a file we wrote stays ours)
                removed.add(key)
                if key in self._index and not os.path.lexists(self._path(key)):
                    self._drop(key)
            else:
                self._adopt(key, size)
        return removed

    def _adopt(self, key: bytes, size: int) -> None:
        """Index a chunk file another process wrote (lock held)."""
        if size == self.file_bytes and key not in self._index:  # another layout's is not ours
            self._index[key] = size
            self._index.move_to_end(key, last=False)  # never read here: first to go
            self._seen[key] = time.time_ns()  # written just now: a later mtime is a read elsewhere
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
                write_all(fd, [header, _PAD, data])
                mtime = os.fstat(fd).st_mtime_ns
            finally:
                os.close(fd)
            with self._lock:
                while self._trimming == key:  # its old file is being unlinked: not the new one
                    self._lock.wait()
                replaced = os.path.lexists(self._path(key))
                os.replace(tmp, self._path(key))
                tmp = None
                if replaced:  # the old file's bytes are gone, whoever had counted them
                    self._usage.add(-size)
                self._drop(key)
                self._index[key] = size
                self._seen[key] = mtime
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
                unlink(tmp)
            self._made_dirs.discard(key[:1].hex())
            return False

    def page_cached(self, keys: Sequence[bytes]) -> bool | None:
        """Whether the files of ``keys`` look held by the page cache: their last pages are asked
        with ``mincore``, which reads nothing in. None where a file is gone or cannot be mapped.
        For the cost model: a cold file reads at the device's speed, a cached one at the memory's
        (on an H100 host 0.8-1.4 GB/s against ~13 GB/s)."""
        for key in keys:
            try:
                fd = os.open(self._path(key), os.O_RDONLY)
            except OSError:
                return None
            try:
                last = max(0, os.fstat(fd).st_size - 1)
                if resident_pages(fd, last, 1) == 0:
                    return False
            except OSError:
                return None
            finally:
                os.close(fd)
        return True

    def get_into(self, keys: Sequence[bytes], dests: Sequence[Buffer]) -> list[bool]:
        outs = [self._dest(d) for _, d in zip(keys, dests, strict=True)]  # wrong sizes raise before any read
        self._catch_up(keys)
        found = [False] * len(keys)
        # One task per distinct key: a key asked twice is read twice, in order, by one thread,
        # so a corrupt file is counted and removed once, as when reads ran one after another.
        places: dict[bytes, list[int]] = {}
        for i, key in enumerate(keys):
            places.setdefault(key, []).append(i)

        def read(key: bytes) -> None:
            for i in places[key]:
                found[i] = self._get_one(key, outs[i])

        todo = []
        for key in places:
            if key in self._index:
                todo.append(key)
            else:
                read(key)  # a miss: nothing to read
        pool = self._read_pool() if len(todo) > 1 else None
        if pool is None:
            for key in todo:
                read(key)
        else:
            _run_all(pool, read, todo)
        return found

    def _dest(self, dest: Buffer) -> memoryview:
        out = as_bytes(dest)
        if len(out) != self.layout.nbytes:
            raise ValueError(f"destination of {len(out)} bytes, the layout needs {self.layout.nbytes}")
        return out

    def _read_pool(self) -> ThreadPoolExecutor | None:
        """The tier's reader threads, made on first use; None when reads stay on the caller's thread."""
        with self._lock:
            if self._readers is not None and self._readers_pid != os.getpid():
                self._readers = None  # a forked child has the pool but not its threads
            if self._readers is None and self.read_threads > 1 and not self._closed:
                self._readers = ThreadPoolExecutor(self.read_threads, thread_name_prefix="kvtier-disk-read")
                self._readers_pid = os.getpid()
            return self._readers

    def _get_one(self, key: bytes, out: memoryview) -> bool:
        if key not in self._index:
            with self._lock:
                self._stats.misses += 1
            return False
        path = self._path(key)
        try:
            fd = open_file(path)
        except OSError as e:  # vanished, or not a regular file (never ours): forgotten
            self._forget(key, None, error=e.errno not in (errno.ENOENT, errno.EINVAL, errno.ELOOP))
            return False
        st = None
        try:
            st = os.fstat(fd)
            direct = self._read_checked(fd, key, out, st, path)
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
            if direct:
                self._stats.extra["direct_reads"] += 1
                self._stats.extra["direct_bytes"] += direct
        try:
            # Recency for the index rebuilt after a restart, and for a process that evicts
            # while this one reads (a writer child, another engine: see _victim).
            os.utime(path)
        except OSError:
            pass
        with self._lock:
            if key in self._index:
                self._seen[key] = time.time_ns()  # not older than the mtime just set: our own read
        return True

    def _read_checked(self, fd: int, key: bytes, out: memoryview, st: os.stat_result, path: str) -> int:
        """Read the chunk of ``fd`` into ``out``, raising CorruptChunk unless it is exactly right;
        the bytes read with O_DIRECT.

        The checksum is the header's xxh3-64 of the payload (:func:`kvtier.layout.checksum`),
        computed piece by piece as each piece lands in ``out``.
        """
        direct = DirectReads(self, fd, path, st, out, DATA_OFFSET) if self._may_read_direct(out) else None
        try:
            header = self._read_header(fd, key, st.st_size)
            h = xxhash.xxh3_64()
            n = len(out)
            pos = 0
            while pos < n:
                piece = out[pos:pos + _READ_PIECE]
                k = direct.read(piece, pos) if direct is not None else None
                if k is None:
                    k = os.preadv(fd, [piece], DATA_OFFSET + pos)
                if k <= 0:
                    raise CorruptChunk(f"payload truncated ({pos} of {n} bytes)")
                h.update(out[pos:pos + k])  # as soon as it lands: still in the CPU cache after a copy
                pos += k
            if h.intdigest() != header.checksum:
                raise CorruptChunk("checksum mismatch")
            return direct.nbytes if direct is not None else 0
        finally:
            if direct is not None:
                direct.close()

    def _read_header(self, fd: int, key: bytes, file_size: int) -> Header:
        """The header of the chunk file ``fd``, checked against what this tier expects."""
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
        return header

    def _may_read_direct(self, out: memoryview) -> bool:
        """Whether pieces of ``out`` can be read with O_DIRECT: it starts on a page (pinned
        host memory does; a plain torch or numpy allocation usually does not)."""
        return self.direct_io and self.nowait_probe and len(out) >= ALIGN and address(out) % ALIGN == 0

    def no_direct(self, why: OSError) -> None:
        if self.direct_io:
            self.direct_io = False
            log.info("disk tier: no O_DIRECT under %s (%s); every read goes through the page cache",
                     self.root, why.strerror or why)

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
            size = self._index.get(key, 0)
            self._drop(key)
            if not os.path.lexists(path):
                self._vanished(key, size)

    def _drop(self, key: bytes) -> None:
        """Remove ``key`` from the index (lock held)."""
        size = self._index.pop(key, None)
        self._seen.pop(key, None)
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
                with open(open_file(self._path(k)), "rb", buffering=0) as f:
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
            readers, self._readers = self._readers, None
        if readers is not None:
            readers.shutdown(wait=True)


def _run_all(pool: ThreadPoolExecutor, fn, items: list) -> None:
    """``fn(item)`` for every item on ``pool``; returns when all are done, raising the first error."""
    futures: list[Future] = []
    for item in items:
        try:
            futures.append(pool.submit(fn, item))
        except RuntimeError:  # close() shut the pool down meanwhile: read here
            fn(item)
    wait(futures)
    for f in futures:
        f.result()
