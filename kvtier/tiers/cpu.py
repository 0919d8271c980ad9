"""The cpu tier: an LRU index of chunks held in :class:`kvtier.memory.HostPool` slots.

The tier owns one reference to each slot it indexes. Readers take their own
reference (:meth:`CpuTier.acquire`), so evicting a chunk that is being loaded
removes it from the index at once but frees its memory only after the load.

:meth:`CpuTier.mark_unwritten` notes that a chunk is not yet written to the lower tiers (the
store's write queue was full): :meth:`CpuTier.take_unwritten` hands such chunks to the store's
writers in the order they were marked, and evicting one first offers it to ``spill`` (the store
moves it to its write queue, slot and all, when there is room), so a chunk is never dropped
unnoticed.

:meth:`CpuTier.track_changes` starts a journal of keys indexed and dropped, which
:meth:`CpuTier.take_changes` hands over: a vLLM worker process reports it to its
scheduler, which lives in another process and cannot see this tier.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence

from kvtier.hostcopy import copy_bytes
from kvtier.memory import ChunkRef, HostPool
from kvtier.tiers.base import Buffer, Protected, StoredChunk, Tier, TierStats, lru_victim, never_protected

# spill(key, ref, targets) -> whether it took ``ref``: called for an unwritten chunk being evicted.
Spill = Callable[[bytes, ChunkRef, object], bool]


class CpuTier(Tier):
    name = "cpu"

    def __init__(self, pool: HostPool, protected: Protected = never_protected, spill: Spill | None = None) -> None:
        self.pool = pool
        self.protected = protected
        self.spill = spill
        self._index: OrderedDict[bytes, ChunkRef] = OrderedDict()
        # Indexed chunks not yet written to the lower tiers: key -> their targets, oldest mark first.
        self._unwritten: OrderedDict[bytes, object] = OrderedDict()
        self._lock = threading.Lock()
        self._journal: dict[bytes, bool] | None = None  # key -> now indexed?, since the last take
        self._stats = TierStats("cpu", capacity_bytes=pool.slot_bytes * pool.num_slots)

    # Zero-copy paths used by the store.
    def acquire(self, key: bytes) -> ChunkRef | None:
        """A new reference to the chunk under ``key`` (marks it recently used), or None."""
        with self._lock:
            ref = self._index.get(key)
            if ref is None:
                self._stats.misses += 1
                return None
            self._index.move_to_end(key)
            self._stats.hits += 1
            self._stats.bytes_read += self.pool.slot_bytes
            return ref.share()

    def acquire_many(self, keys: Sequence[bytes]) -> list[ChunkRef | None]:
        """:meth:`acquire` of each key, under one lock (a 32K-token load asks for 128 at once)."""
        out: list[ChunkRef | None] = []
        index, stats = self._index, self._stats
        with self._lock:
            for key in keys:
                ref = index.get(key)
                if ref is None:
                    stats.misses += 1
                    out.append(None)
                    continue
                index.move_to_end(key)
                stats.hits += 1
                stats.bytes_read += self.pool.slot_bytes
                out.append(ref.share())
        return out

    def insert(self, key: bytes, ref: ChunkRef) -> None:
        """Index ``ref`` under ``key``; the tier takes ownership of ``ref``."""
        with self._lock:
            old = self._index.pop(key, None)
            self._index[key] = ref
            self._note(key, True)
            self._stats.puts += 1
            self._stats.bytes_written += self.pool.slot_bytes
        if old is not None:
            old.release()

    def alloc(self) -> ChunkRef | None:
        """A writable slot, evicting least recently used unprotected chunks if needed."""
        while True:
            slot = self.pool.alloc()
            if slot is not None:
                return ChunkRef(self.pool, slot)
            if not self._evict_one():
                return None

    def alloc_many(self, n: int) -> list[ChunkRef]:
        """Up to ``n`` writable slots: free ones taken under one lock, the rest by evicting."""
        out = [ChunkRef(self.pool, slot) for slot in self.pool.alloc_many(n)]
        while len(out) < n:
            ref = self.alloc()
            if ref is None:
                break
            out.append(ref)
        return out

    def _evict_one(self) -> bool:
        """Drop the least recently used chunk from the index. Its slot is freed unless ``spill``
        keeps it for a write (then the caller's loop evicts another; writes pin a bounded number)."""
        with self._lock:
            victim = lru_victim(self._index, self.protected)
            if victim is None:
                return False
            ref = self._index.pop(victim)
            targets = self._unwritten.pop(victim, None)
            self._note(victim, False)
            self._stats.evictions += 1
        # Outside the lock: spill takes the store's write lock, which is held while calling in here.
        if targets is not None and self.spill is not None and self.spill(victim, ref, targets):
            return True
        ref.release()
        return True

    # Chunks not yet written down (see the module docstring).
    def mark_unwritten(self, key: bytes, targets: object) -> bool:
        """Note that the indexed chunk ``key`` still has to be written to ``targets``; False if
        ``key`` is not indexed (evicted meanwhile: the caller counts it lost)."""
        with self._lock:
            if key not in self._index:
                return False
            self._unwritten.setdefault(key, targets)
            return True

    def take_unwritten(self) -> tuple[bytes, ChunkRef, object] | None:
        """The oldest unwritten chunk, unmarked: its key, a new reference to its slot and its targets."""
        with self._lock:
            if not self._unwritten:
                return None
            key, targets = self._unwritten.popitem(last=False)
            return key, self._index[key].share(), targets

    def unwritten(self) -> int:
        """How many indexed chunks are not yet written down."""
        return len(self._unwritten)

    # The generic Tier interface.
    def contains(self, keys: Sequence[bytes]) -> list[bool]:
        index = self._index
        return [k in index for k in keys]

    def get_into(self, keys: Sequence[bytes], dests: Sequence[Buffer]) -> list[bool]:
        out = []
        for key, dest in zip(keys, dests, strict=True):
            ref = self.acquire(key)
            if ref is None:
                out.append(False)
                continue
            with ref:
                copy_bytes(dest, ref.data)
            out.append(True)
        return out

    def put(self, keys: Sequence[bytes], payloads: Sequence[Buffer]) -> list[bool]:
        out = []
        for key, payload in zip(keys, payloads, strict=True):
            ref = self.alloc()
            if ref is None:
                out.append(False)
                continue
            copy_bytes(ref.data, payload)
            self.insert(key, ref)
            out.append(True)
        return out

    def delete(self, keys: Sequence[bytes]) -> None:
        refs = []
        with self._lock:
            for k in keys:
                ref = self._index.pop(k, None)
                if ref is not None:
                    refs.append(ref)
                    self._unwritten.pop(k, None)  # deleted on purpose: not to be written either
                    self._note(k, False)
        for ref in refs:
            ref.release()

    # Change journal (see the module docstring).
    def _note(self, key: bytes, present: bool) -> None:
        if self._journal is not None:  # under self._lock
            self._journal.pop(key, None)  # keep the order of the last change
            self._journal[key] = present

    def track_changes(self) -> None:
        """Start journaling keys indexed and dropped (the current index counts as indexed)."""
        with self._lock:
            if self._journal is None:
                self._journal = dict.fromkeys(self._index, True)

    def take_changes(self) -> tuple[list[bytes], list[bytes]]:
        """(keys now indexed, keys now dropped) since the last call; empty if not tracking."""
        with self._lock:
            if not self._journal:
                return [], []
            journal, self._journal = self._journal, {}
        return [k for k, p in journal.items() if p], [k for k, p in journal.items() if not p]

    def stats(self) -> TierStats:
        with self._lock:
            self._stats.chunks = len(self._index)
            self._stats.bytes = len(self._index) * self.pool.slot_bytes
        return self._stats

    def scan(self) -> Iterator[StoredChunk]:
        with self._lock:
            keys = list(self._index)
        return (StoredChunk(k, self.pool.slot_bytes, "") for k in keys)

    def close(self) -> None:
        with self._lock:
            refs = list(self._index.values())
            for k in self._index:
                self._note(k, False)
            self._index.clear()
            self._unwritten.clear()
        for ref in refs:
            ref.release()
