"""Host memory for chunks: one large allocation cut into fixed-size slots.

Pinned when CUDA is present (so DMA to and from the GPU runs at link speed),
plain on CPU. ``alloc`` and ``release`` are O(1) and allocate nothing: the hot
path never calls the allocator. Each slot has a reference count; a slot goes
back to the free list only when its last reference is released, so memory
that someone is still reading is never handed out again.
"""

from __future__ import annotations

import threading

import torch


class PoolExhausted(RuntimeError):
    """No free slot; the caller evicts something or skips the work."""


class HostPool:
    """``num_slots`` slots of ``slot_bytes`` each, reference counted."""

    def __init__(self, slot_bytes: int, num_slots: int, pin: bool | None = None,
                 buffer: torch.Tensor | None = None) -> None:
        """``buffer``: carve the slots out of this uint8 tensor (e.g. shared memory) instead of allocating."""
        if slot_bytes <= 0 or num_slots <= 0:
            raise ValueError(f"HostPool needs slot_bytes > 0 and num_slots > 0, got {slot_bytes}, {num_slots}")
        if pin is None:
            pin = torch.cuda.is_available()
        self.slot_bytes = slot_bytes
        self.num_slots = num_slots
        if buffer is None:
            buffer = torch.empty(slot_bytes * num_slots, dtype=torch.uint8, pin_memory=pin)
        elif buffer.dtype != torch.uint8 or buffer.numel() < slot_bytes * num_slots:
            raise ValueError(f"HostPool buffer must be uint8 of at least {slot_bytes * num_slots} bytes")
        elif pin and not buffer.is_pinned():
            rc = torch.cuda.cudart().cudaHostRegister(buffer.data_ptr(), buffer.numel(), 0)
            if int(getattr(rc, "value", rc)) != 0:  # unpinned, copies would be slow and synchronous
                raise RuntimeError(f"cudaHostRegister of the {buffer.numel()}-byte pool failed (error {rc})")
        self.pinned = pin
        self.buffer = buffer
        self._views = [self.buffer[i * slot_bytes:(i + 1) * slot_bytes] for i in range(num_slots)]
        self._refs = [0] * num_slots
        self._free = list(range(num_slots - 1, -1, -1))
        self._lock = threading.Lock()

    @classmethod
    def for_bytes(cls, total_bytes: int, slot_bytes: int, pin: bool | None = None) -> "HostPool":
        n = total_bytes // slot_bytes
        if n < 1:
            raise ValueError(
                f"cpu_bytes={total_bytes} holds no chunk of {slot_bytes} bytes; raise cpu_bytes "
                f"to at least {slot_bytes} (better: hundreds of chunks)"
            )
        return cls(slot_bytes, n, pin)

    def alloc(self) -> int | None:
        """A free slot with one reference, or None when every slot is in use."""
        with self._lock:
            if not self._free:
                return None
            slot = self._free.pop()
            self._refs[slot] = 1
            return slot

    def alloc_many(self, n: int) -> list[int]:
        """Up to ``n`` free slots (fewer if fewer are free), each with one reference."""
        with self._lock:
            k = min(n, len(self._free))
            slots = self._free[len(self._free) - k:][::-1] if k else []
            del self._free[len(self._free) - k:]
            for slot in slots:
                self._refs[slot] = 1
            return slots

    def retain(self, slot: int) -> None:
        with self._lock:
            if self._refs[slot] <= 0:
                raise RuntimeError(f"retain of free slot {slot}")
            self._refs[slot] += 1

    def release(self, slot: int) -> None:
        with self._lock:
            refs = self._refs[slot]
            if refs <= 0:
                raise RuntimeError(f"double release of slot {slot}")
            self._refs[slot] = refs - 1
            if refs == 1:
                self._free.append(slot)

    def refcount(self, slot: int) -> int:
        return self._refs[slot]

    def view(self, slot: int) -> torch.Tensor:
        """The slot's bytes as a uint8 tensor (shares memory with the pool)."""
        return self._views[slot]

    @property
    def free_slots(self) -> int:
        return len(self._free)


class ChunkRef:
    """One reference to a pool slot holding (or about to hold) one chunk.

    ``data`` stays valid and unchanged until :meth:`release`; releasing twice is an error.
    """

    __slots__ = ("pool", "slot", "_released")

    def __init__(self, pool: HostPool, slot: int) -> None:
        self.pool = pool
        self.slot = slot
        self._released = False

    @property
    def data(self) -> torch.Tensor:
        if self._released:
            raise RuntimeError("ChunkRef used after release")
        return self.pool.view(self.slot)

    def share(self) -> "ChunkRef":
        """Another reference to the same slot, released independently."""
        self.pool.retain(self.slot)
        return ChunkRef(self.pool, self.slot)

    def release(self) -> None:
        if self._released:
            raise RuntimeError("ChunkRef released twice")
        self._released = True
        self.pool.release(self.slot)

    def __enter__(self) -> "ChunkRef":
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._released:
            self.release()
