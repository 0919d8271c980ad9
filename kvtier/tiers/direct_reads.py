"""O_DIRECT reads of a chunk file's pieces that are not in the page cache (the disk tier).

A piece already in the page cache is copied from there; one that is not is read from the device
straight into the destination (pinned host memory is page-aligned), at the device's speed and
without filling the page cache with a chunk that now lives in host memory.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
from typing import Protocol

import numpy as np

log = logging.getLogger("kvtier.tiers.disk")

# O_DIRECT needs the buffer address, the file offset and the length aligned to the device's
# logical block; a page covers every common one.
ALIGN = 4096
O_DIRECT = getattr(os, "O_DIRECT", 0)
RWF_NOWAIT = getattr(os, "RWF_NOWAIT", 0)
_libc = ctypes.CDLL(None, use_errno=True)


class DirectPolicy(Protocol):
    """What a reader asks of its tier: whether O_DIRECT and ``RWF_NOWAIT`` probes still work
    under its directory (each cleared for good at the first refusal)."""

    root: object
    direct_io: bool
    nowait_probe: bool

    def no_direct(self, why: OSError) -> None:
        """O_DIRECT was refused under this directory: read through the page cache from now on."""


class DirectReads:
    """The O_DIRECT side of reading one chunk file: a piece that is not in the page cache is
    read from the device straight into the destination.

    Whether a piece is cached is asked with a one-page ``RWF_NOWAIT`` read (it fails rather
    than wait for the device). Such a read that misses starts the file's readahead (8 MiB on
    the 2-core box), which would read the data a second time beside the O_DIRECT read; the
    descriptor is therefore set to ``POSIX_FADV_RANDOM``, and a probe that misses reads
    its one page only. The first page of a piece stands for the whole piece.
    """

    def __init__(self, tier: DirectPolicy, fd: int, path: str, st: os.stat_result, out: memoryview,
                 data_offset: int) -> None:
        """Pieces of ``out`` come from file offset ``data_offset`` on (the payload's start)."""
        self.tier, self.fd, self.path, self.st = tier, fd, path, st
        self.data_offset = data_offset
        self.base = address(out)
        self.dfd: int | None = None  # the O_DIRECT descriptor, opened by the first piece that needs it
        self.opened = False
        self.nbytes = 0
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        except OSError:
            pass

    def read(self, piece: memoryview, pos: int) -> int | None:
        """Read ``piece`` (payload offset ``pos``) with O_DIRECT when that helps and works;
        the bytes read, or None when the caller reads it through the page cache."""
        if not self.tier.direct_io or (self.base + pos) % ALIGN or len(piece) % ALIGN:
            return None
        if self._cached(piece, pos):
            return None
        dfd = self._direct_fd()
        if dfd is None:
            return None
        try:
            k = os.preadv(dfd, [piece], self.data_offset + pos)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            self.tier.no_direct(e)  # an alignment the device refuses
            return None
        self.nbytes += max(k, 0)
        return k

    def _cached(self, piece: memoryview, pos: int) -> bool:
        """Whether the piece's first page is in the page cache; it is read into the piece itself
        (no scratch buffer; the piece is read whole afterwards anyway)."""
        if not self.tier.nowait_probe:
            return True  # cannot tell: through the page cache, as before
        try:
            os.preadv(self.fd, [piece[:ALIGN]], self.data_offset + pos, RWF_NOWAIT)
            return True
        except BlockingIOError:
            return False
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
            self.tier.nowait_probe = False
            log.info("disk tier: RWF_NOWAIT unsupported under %s (%s); every read goes through the page cache",
                     self.tier.root, e.strerror or e)
            return True

    def _direct_fd(self) -> int | None:
        if not self.opened:
            self.opened = True
            self.dfd = self._open_direct()
        return self.dfd

    def _open_direct(self) -> int | None:
        """An O_DIRECT descriptor of the file we are reading, or None."""
        try:
            dfd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | O_DIRECT)
        except OSError as e:
            if e.errno == errno.EINVAL:
                self.tier.no_direct(e)  # a file system without O_DIRECT (older tmpfs, some FUSE)
            return None
        try:
            st = os.fstat(dfd)
            same = (st.st_ino, st.st_dev) == (self.st.st_ino, self.st.st_dev)
        except OSError:
            same = False
        if not same:  # replaced since we opened it: its bytes would not match the header we read
            os.close(dfd)
            return None
        return dfd

    def close(self) -> None:
        if self.dfd is not None:
            os.close(self.dfd)
            self.dfd = None


def address(buf: memoryview) -> int:
    """The address of the first byte of ``buf``."""
    return np.frombuffer(buf, dtype=np.uint8).ctypes.data


def resident_pages(fd: int, offset: int, length: int) -> int:
    """How many pages of ``[offset, offset + length)`` of the open file ``fd`` are in the page cache,
    asked with ``mincore`` over a private mapping of just that range: asking reads nothing in (a
    read with ``RWF_NOWAIT`` that is refused still starts reading the page, so a second probe of a
    cold file would find it cached). Raises OSError where the range cannot be mapped."""
    first = offset - offset % mmap.ALLOCATIONGRANULARITY
    size = os.fstat(fd).st_size
    end = min(size, offset + length)
    if end <= first:
        return 0
    pages = -(-(end - first) // mmap.PAGESIZE)
    m = mmap.mmap(fd, end - first, access=mmap.ACCESS_COPY, offset=first)
    try:
        base = ctypes.c_char.from_buffer(m)
        vec = (ctypes.c_ubyte * pages)()
        rc = _libc.mincore(ctypes.c_void_p(ctypes.addressof(base)), ctypes.c_size_t(end - first), vec)
        del base  # before the mapping closes
        if rc != 0:
            raise OSError(ctypes.get_errno(), "mincore failed")
        skip = (offset - first) // mmap.PAGESIZE
        return sum(v & 1 for v in vec[skip:])
    finally:
        m.close()
