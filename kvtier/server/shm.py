"""The shared-memory file that holds the server's slots.

A file under ``/dev/shm`` (POSIX shared memory), created by the server with mode
0600 and mapped by clients of the same user. Layout::

    [0, 4096)            header: magic, slot_bytes, num_slots, gen_offset, data_offset, server id
    [gen_offset, ...)    one uint64 generation per slot
    [data_offset, ...)   num_slots slots of slot_bytes

A slot's generation grows each time the server hands the slot out for writing. A
client records it when it receives a slot and checks it after reading
(:meth:`SharedRegion.generation`): if it changed, the server had taken the slot back
(the client was presumed dead) and what was read must be treated as a miss.
"""

from __future__ import annotations

import mmap
import os
import re
import struct

import numpy as np
import torch

from kvtier.memory import HostPool

MAGIC = b"KVTSHM01"
_HEADER = struct.Struct("<8sQQQQ32s")
_ALIGN = 1 << 21  # 2 MiB: slots start on a huge-page boundary
SHM_DIR = "/dev/shm"


def _align(n: int, a: int = _ALIGN) -> int:
    return (n + a - 1) // a * a


def region_size(slot_bytes: int, num_slots: int) -> tuple[int, int, int]:
    """(gen_offset, data_offset, total bytes)."""
    gen_offset = 4096
    data_offset = _align(gen_offset + 8 * num_slots)
    return gen_offset, data_offset, data_offset + slot_bytes * num_slots


class SharedRegion:
    """One mapping of the shared file (the server's or a client's)."""

    def __init__(self, path: str, fd: int, size: int, slot_bytes: int, num_slots: int,
                 gen_offset: int, data_offset: int, server_id: str) -> None:
        self.path = path
        self.size = size
        self.slot_bytes = slot_bytes
        self.num_slots = num_slots
        self.gen_offset = gen_offset
        self.data_offset = data_offset
        self.server_id = server_id
        try:
            self._mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        self.gens = np.frombuffer(self._mm, dtype=np.uint64, count=num_slots, offset=gen_offset)
        whole = torch.frombuffer(self._mm, dtype=torch.uint8)
        self.data = whole[data_offset:data_offset + slot_bytes * num_slots]
        self.pinned = False

    @classmethod
    def create(cls, slot_bytes: int, num_slots: int, server_id: str, directory: str = SHM_DIR) -> "SharedRegion":
        """Create (O_EXCL, 0600) and size the file; fail early if /dev/shm cannot hold it."""
        gen_offset, data_offset, size = region_size(slot_bytes, num_slots)
        path = os.path.join(directory, f"kvtier-{server_id}")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.fchmod(fd, 0o600)
            try:
                os.posix_fallocate(fd, 0, size)  # reserve now: a full tmpfs is an error here, not a SIGBUS later
            except OSError as e:
                free = os.statvfs(directory)
                raise OSError(
                    e.errno, f"cannot reserve {size / 2**30:.2f} GiB in {directory} "
                    f"({free.f_bavail * free.f_frsize / 2**30:.2f} GiB free); lower cpu_bytes or enlarge "
                    f"{directory} (docker: --shm-size)") from e
            header = _HEADER.pack(MAGIC, slot_bytes, num_slots, gen_offset, data_offset,
                                  server_id.encode().ljust(32, b"\0"))
            os.pwrite(fd, header, 0)
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise
        return cls(path, fd, size, slot_bytes, num_slots, gen_offset, data_offset, server_id)

    @classmethod
    def open(cls, path: str) -> "SharedRegion":
        """Map an existing region (client side); checks the header."""
        fd = os.open(path, os.O_RDWR)
        try:
            raw = os.pread(fd, _HEADER.size, 0)
            magic, slot_bytes, num_slots, gen_offset, data_offset, sid = _HEADER.unpack(raw)
            if magic != MAGIC:
                raise ValueError(f"{path} is not a kvtier shared region")
            size = data_offset + slot_bytes * num_slots
            if os.fstat(fd).st_size < size:
                raise ValueError(f"{path} is shorter than its header says")
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd, size, slot_bytes, num_slots, gen_offset, data_offset, sid.rstrip(b"\0").decode())

    def slot(self, i: int) -> torch.Tensor:
        return self.data[i * self.slot_bytes:(i + 1) * self.slot_bytes]

    def generation(self, i: int) -> int:
        return int(self.gens[i])

    def pin(self) -> bool:
        """Register the data area with CUDA (page-locked, DMA-able); False when there is no CUDA."""
        if self.pinned or not torch.cuda.is_available():
            return self.pinned
        rc = torch.cuda.cudart().cudaHostRegister(self.data.data_ptr(), self.data.numel(), 0)
        self.pinned = int(getattr(rc, "value", rc)) == 0
        return self.pinned

    def unpin(self) -> None:
        if self.pinned:
            torch.cuda.cudart().cudaHostUnregister(self.data.data_ptr())
            self.pinned = False

    def unlink(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


class SharedPool(HostPool):
    """A :class:`HostPool` over a :class:`SharedRegion` that bumps a slot's generation on each alloc."""

    def __init__(self, region: SharedRegion) -> None:
        super().__init__(region.slot_bytes, region.num_slots, pin=False, buffer=region.data)
        self.region = region

    def alloc(self) -> int | None:
        slot = super().alloc()
        if slot is not None:
            self.region.gens[slot] += 1  # before anyone can write: readers of the old content see the change
        return slot


def remove_stale(prefix: str, directory: str = SHM_DIR) -> list[str]:
    """Remove ``kvtier-{prefix}-{pid}-*`` files whose server process is gone (a SIGKILLed server)."""
    removed = []
    pat = re.compile(rf"^kvtier-{re.escape(prefix)}-(\d+)-[0-9a-f]+$")
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        m = pat.match(name)
        if not m:
            continue
        pid = int(m.group(1))
        try:
            os.kill(pid, 0)
            continue  # alive
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        try:
            os.unlink(os.path.join(directory, name))
            removed.append(name)
        except OSError:
            pass
    return removed
