"""The interface every tier implements, and what the store relies on.

Contract (each is tested for every tier):
- Calls are batched: one call answers for many keys, in order.
- A tier never raises from ``contains``/``get_into``/``put``/``delete`` because its
  backend failed (dead server, full or unwritable disk, corrupt data): it answers a
  miss / ``False``, counts the error in its stats, and recovers when the backend does.
  Programming errors (wrong buffer size) still raise.
- ``get_into`` writes a payload into the caller's buffer only after checking it; on a
  ``False`` answer the buffer's content is unspecified and must not be used.
- ``put`` stores a copy; the caller may reuse its buffer when ``put`` returns.
- Eviction never removes a key for which ``protected(key)`` is true (a leased chunk).
- A tier whose backend calls can block without a bound of their own says how long a call may
  take (:meth:`Tier.deadline`); the store stops waiting then, answers misses, and keeps the
  call's destination buffers out of use until the call really returns (it may still write).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

Buffer = memoryview | np.ndarray
Protected = Callable[[bytes], bool]


def as_bytes(buf: Buffer) -> memoryview:
    """A flat, byte-typed view of ``buf`` (no copy)."""
    if isinstance(buf, np.ndarray):
        return memoryview(buf.reshape(-1).view(np.uint8))
    mv = memoryview(buf)
    return mv if mv.format == "B" and mv.ndim == 1 else mv.cast("B")


SLOW_BYTES_PER_S = 50e6  # a remote call's bytes get their time at this rate before it counts as hung


def time_for_bytes(nbytes: int, floor_s: float, slow_bytes_per_s: float) -> float:
    """How long a call moving ``nbytes`` may take: ``floor_s``, or their time at ``slow_bytes_per_s``."""
    return max(floor_s, nbytes / slow_bytes_per_s)


def chunk_views(keys: Sequence[bytes], bufs: Sequence[Buffer], nbytes: int, what: str) -> list[memoryview]:
    """``bufs`` as byte views, one per key and each ``nbytes`` long (ValueError naming ``what``)."""
    views = [as_bytes(b) for b in bufs]
    if len(views) != len(keys):
        raise ValueError(f"{len(keys)} keys but {len(views)} {what}s")
    for v in views:
        if len(v) != nbytes:
            raise ValueError(f"{what} of {len(v)} bytes, the layout needs {nbytes}")
    return views


def never_protected(key: bytes) -> bool:
    return False


@dataclass
class TierStats:
    """Counters of one tier since it started."""

    name: str
    chunks: int = 0
    bytes: int = 0
    capacity_bytes: int = 0
    hits: int = 0
    misses: int = 0
    puts: int = 0
    evictions: int = 0
    errors: int = 0
    corrupt: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    extra: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class StoredChunk:
    """What `kvtier inspect` shows of one stored chunk."""

    key: bytes
    nbytes: int
    label: str


class Tier(ABC):
    """A place that holds chunks by key."""

    name: str = "tier"

    @abstractmethod
    def contains(self, keys: Sequence[bytes]) -> list[bool]:
        """Which of ``keys`` this tier holds now (a hint: a later get may still miss)."""

    @abstractmethod
    def get_into(self, keys: Sequence[bytes], dests: Sequence[Buffer]) -> list[bool]:
        """Copy each key's verified payload into ``dests[i]``; True where that worked."""

    @abstractmethod
    def put(self, keys: Sequence[bytes], payloads: Sequence[Buffer]) -> list[bool]:
        """Store copies of the payloads; True where stored."""

    @abstractmethod
    def delete(self, keys: Sequence[bytes]) -> None:
        """Remove keys if present."""

    @abstractmethod
    def stats(self) -> TierStats:
        """Counters and occupancy."""

    def deadline(self, op: str, nbytes: int) -> float | None:
        """Seconds the store waits for ``op`` ("contains", "get_into", "put") moving ``nbytes``
        before it answers misses (or not stored) without it; None: the tier bounds its own calls
        (the default). The writer process (``writer: process``) calls ``put`` without it."""
        return None

    def register_memory(self, buffer: Buffer) -> None:
        """``buffer`` (host memory whose slices later calls pass) may be prepared for direct
        transfers, e.g. registered with an RDMA/TCP transfer engine. Optional; no-op here."""

    def scan(self) -> Iterator[StoredChunk]:
        """Every chunk held (for inspection; may be slow)."""
        return iter(())

    def close(self) -> None:
        """Release resources; the tier is unusable afterwards."""


def lru_victim(index: "OrderedDict[bytes, object]", protected: Protected) -> bytes | None:
    """The least recently used key of ``index`` that is not protected, or None (lock held).

    Protected keys walked past move to the recent end, so each is passed over once per pass
    through the unprotected keys rather than once per eviction: with L leased and U other
    chunks, O(L / U) amortized per eviction instead of O(L) (issue 17.1).
    """
    for _ in range(len(index)):
        key = next(iter(index))
        if not protected(key):
            return key
        index.move_to_end(key)
    return None
