"""The store: one object over the tiers, the only thing engines talk to.

- ``lookup`` answers how many leading chunk keys some tier holds: one batched
  ``contains`` per tier, asking each tier only about keys the faster tiers lacked.
- ``get`` hands out references to host slots holding verified chunks; a hit in a
  lower tier is read into a fresh slot and promoted to ``cpu`` (and written back to
  the tiers between, so the next reader finds it closer).
- ``allocate`` + ``commit`` is the save path: the engine fills a slot, the store
  indexes it in ``cpu`` and queues it for the lower tiers. Background threads (or a
  writer process) drain that bounded queue; a chunk that finds it full stays in ``cpu``
  marked unwritten and is written when there is room. Only a chunk the cpu tier must
  evict before then is dropped (counted, with its reason); the engine never waits.
- ``lease`` keeps chunks found by a lookup from eviction until their load is done.

A tier that raises (a bug: tiers are meant to answer misses) is counted and
treated as a miss, so the serving process never dies because a tier did.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Sequence

import torch
from prometheus_client import Counter

from kvtier.config import KVTierConfig
from kvtier.costs import CACHED, CostModel
from kvtier.hostcopy import copy_bytes
from kvtier.layout import ChunkLayout, payload_bytes
from kvtier.memory import ChunkRef, HostPool
from kvtier.metrics import Metrics
from kvtier.tiers import make_tier
from kvtier.tiers.base import Buffer, Tier
from kvtier.tiers.calls import DeadlineCalls
from kvtier.tiers.cpu import CpuTier

log = logging.getLogger(__name__)

# Without a cpu tier the pool only stages chunks on their way to or from a lower tier.
_STAGING_SLOTS = 64
# Chunks a background promotion reads per batch, and at most this many keys wait for one.
_PROMOTE_BATCH = 8
_PROMOTE_QUEUE = 4096
# At most 1/_QUEUE_SHARE of the host slots wait in the write-behind queue (see Store.__init__).
_QUEUE_SHARE = 2
# The longest chunk key (the writer process's command carries its length in 16 bits).
_MAX_KEY = 65535

# Why a write to the lower tiers was dropped: the ``reason`` of kvtier_dropped_writes_by_reason_total.
DROP_EVICTED_UNWRITTEN = "evicted_unwritten"  # the cpu tier evicted it before a writer had room
DROP_NO_CPU_TIER = "no_cpu_tier_queue_full"  # the queue was full and no cpu tier could keep it meanwhile
DROP_WRITER_LOST = "writer_lost"  # the writer process died while it held the chunk
DROP_CLOSED = "closed"  # still unwritten when close() stopped waiting


def _check_key(key: object) -> None:
    """Refuse a key the write path cannot carry, at the store's edge: a non-bytes key once raised
    deep in the writer process's send, leaving a write nobody finishes (issue 29.8)."""
    if not isinstance(key, bytes):
        raise TypeError(f"chunk keys are bytes, got {type(key).__name__}")
    if len(key) > _MAX_KEY:
        raise ValueError(f"chunk key of {len(key)} bytes; at most {_MAX_KEY}")


def resolve_writer(config: KVTierConfig) -> str:
    """``config.writer`` with "auto" decided: a child process when CUDA is present (an engine
    on a GPU, whose thread must not wait for the GIL behind disk writes), threads otherwise."""
    if config.writer != "auto":
        return config.writer
    return "process" if torch.cuda.is_available() else "threads"


def _drop_counter(metrics: Metrics) -> Counter:
    """Dropped writes by reason; ``kvtier_dropped_writes_total`` stays their sum. One per registry,
    kept on the Metrics object (a Metrics may serve more than one store)."""
    counter = getattr(metrics, "dropped_writes_by_reason", None)
    if counter is None:
        counter = Counter("kvtier_dropped_writes_by_reason", "Write-behind chunks dropped, by reason",
                          ["reason"], registry=metrics.registry)
        metrics.dropped_writes_by_reason = counter
    return counter


class _Write:
    """A chunk on its way to lower tiers, holding one reference to its host slot."""

    __slots__ = ("seq", "key", "ref", "targets")

    def __init__(self, seq: int, key: bytes, ref: ChunkRef, targets: tuple[Tier, ...]) -> None:
        self.seq, self.key, self.ref, self.targets = seq, key, ref, targets


class Lease:
    """Protection of some keys from eviction; release it when the load is done."""

    def __init__(self, store: "Store", keys: Sequence[bytes]) -> None:
        self._store = store
        self.keys = tuple(keys)
        self.expires = time.monotonic() + store.config.lease_ttl_s
        self.released = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._store._end_lease(self)

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class Store:
    """Lookup, load and save of chunks across the configured tiers."""

    def __init__(
        self,
        config: KVTierConfig,
        layout: ChunkLayout,
        label: str = "",
        metrics: Metrics | None = None,
        pin: bool | None = None,
        tiers: Sequence[Tier] | None = None,
        pool: HostPool | None = None,
    ) -> None:
        """``tiers`` overrides the lower tiers built from ``config`` (tests, custom backends);
        ``pool`` supplies the host slots (e.g. shared memory) instead of allocating ``cpu_bytes``."""
        self.config = config
        self.layout = layout
        self.chunk_size = layout.tokens
        self.label = label
        self.metrics = metrics or Metrics()
        self.costs = CostModel(layout.tokens, layout.nbytes, "cuda" if torch.cuda.is_available() else "cpu",
                               config.prefill_gbps)
        # Background promotion (promote_later): keys in order, and the loads it yields to.
        self._deadlines = DeadlineCalls(lambda tier: self.metrics.tier_overruns.labels(tier).inc())
        self._promote_lock = threading.Condition()
        self._promote_queue: dict[bytes, None] = {}
        self._promoter: threading.Thread | None = None
        self._loads_running = 0
        self._lease_lock = threading.Lock()
        self._leased: dict[bytes, int] = {}
        self._leases: dict[Lease, None] = {}  # open leases, oldest (= soonest to expire) first
        if pool is not None and pool.slot_bytes != layout.nbytes:
            raise ValueError(f"pool slots of {pool.slot_bytes} bytes cannot hold chunks of {layout.nbytes}")
        lower_names = [n for n in config.tiers if n != "cpu"]
        # Writes from a child process need the slots in memory it can map: only for the tiers
        # built here from config, into a pool allocated here.
        use_process = (bool(lower_names) and tiers is None and pool is None
                       and resolve_writer(config) == "process")
        num_slots = (config.cpu_bytes // layout.nbytes if "cpu" in config.tiers else _STAGING_SLOTS)
        pool_fd = -1
        if use_process and num_slots >= 1:
            from kvtier.writer import shared_buffer

            try:
                pool_fd, self._pool_map = shared_buffer(num_slots * layout.nbytes)
                pool = HostPool(layout.nbytes, num_slots, pin,
                                buffer=torch.frombuffer(self._pool_map, dtype=torch.uint8))
            except (OSError, RuntimeError, AttributeError) as e:  # AttributeError: no memfd (not Linux)
                log.warning("kvtier: no shared host memory for a writer process (%s); writing from this "
                            "process's threads (writer: threads)", e)
                if pool_fd >= 0:
                    os.close(pool_fd)
                pool_fd, pool = -1, None
        if "cpu" in config.tiers:
            self.pool = pool or HostPool.for_bytes(config.cpu_bytes, layout.nbytes, pin)
            self.cpu: CpuTier | None = CpuTier(self.pool, protected=self.is_leased, spill=self._spill)
        else:
            self.pool = pool or HostPool(layout.nbytes, _STAGING_SLOTS, pin)
            self.cpu = None
        if tiers is None:
            tiers = [make_tier(n, config, layout, label, self.is_leased) for n in lower_names]
        self.lower: list[Tier] = list(tiers)
        for tier in self.lower:  # loads land in and saves leave from these slots
            tier.register_memory(self.pool.buffer)
        self.tiers: list[Tier] = ([self.cpu] if self.cpu else []) + self.lower
        self.metrics.watch_tiers(lambda: self.tiers)
        # Each write waiting for a writer or being written pins its host slot. Bounded by a share
        # of the pool, not by write_queue_depth alone: a lower tier slower than the puts must
        # never pin the slots the cpu tier needs for new chunks and for reads from lower tiers
        # (with 32 MiB chunks, 4 GiB holds only 128). Past the bound a chunk stays in the cpu
        # tier marked unwritten, pinning nothing, until there is room (CpuTier.take_unwritten).
        self.queue_depth = max(1, min(config.write_queue_depth, self.pool.num_slots // _QUEUE_SHARE))
        self._wlock = threading.Condition()  # guards the three below; taken before the cpu tier's lock
        self._ready: deque[_Write] = deque()  # pinned, waiting for a writer thread
        self._inflight: dict[int, _Write] = {}  # seq -> pinned, with a writer thread or the process
        self._held_writes: dict[bytes, _Write] = {}  # key -> its latest pinned write (see _held)
        self._seq = 0
        self._stop_writers = False
        self._drops = _drop_counter(self.metrics)
        self._writers: list[threading.Thread] = []
        self._process = None
        if pool_fd >= 0:
            try:
                self._process = self._start_process(pool_fd, lower_names)
            finally:
                os.close(pool_fd)  # the child has its own copy; the mapping stays
        elif self.lower:
            self._start_threads()
        self._closed = False

    # ---------------------------------------------------------------- lookup
    def lookup(self, keys: Sequence[bytes]) -> int:
        """Number of leading ``keys`` held by some tier (a hint: ``get`` may still miss)."""
        return len(self.locate(keys))

    def _page_cached(self, tier: Tier, first: bytes, last: bytes) -> bool:
        """Whether ``tier`` (one that can tell: the disk) holds the chunks ``first`` and ``last`` (a
        hit's ends) in the page cache; False where it cannot tell."""
        return hasattr(tier, "page_cached") and bool(self._call(tier, "page_cached", [first, last]))

    def cost_tiers(self, keys: Sequence[bytes], tiers: Sequence[str]) -> list[str]:
        """``tiers`` (the tier of each chunk of ``keys``, as :meth:`locate` answers) with a tier whose
        first and last chunks of the hit are in the page cache renamed ``<tier>~cached``: the cost
        model times and costs the two apart."""
        out = list(tiers)
        for tier in self.lower:
            mine = [i for i, t in enumerate(tiers) if t == tier.name]
            if mine and self._page_cached(tier, keys[mine[0]], keys[mine[-1]]):
                for i in mine:
                    out[i] = tier.name + CACHED
        return out

    def locate(self, keys: Sequence[bytes]) -> list[str]:
        """The name of the fastest tier holding each leading key, up to the first key none holds."""
        t0 = time.perf_counter()
        n = len(keys)
        held = self._held_writes  # on its way down, maybe evicted from cpu's index: still in host memory
        where: list[str | None] = ["cpu" if held and k in held else None for k in keys]
        first = 0
        for tier in self.tiers:
            if first >= n:
                break
            answer = self._call(tier, "contains", keys[first:])
            if answer is None:
                continue
            for i, present in enumerate(answer):
                if present and where[first + i] is None:
                    where[first + i] = tier.name
            while first < n and where[first] is not None:
                first += 1
        m = self.metrics
        m.lookups.inc()
        m.hit_tokens.inc(first * self.chunk_size)
        m.miss_tokens.inc((n - first) * self.chunk_size)
        m.observe_latency("store", "lookup", time.perf_counter() - t0)
        return where[:first]  # type: ignore[return-value]

    def contains(self, keys: Sequence[bytes]) -> list[bool]:
        """Per key: whether some tier holds it (used to skip saving what is stored)."""
        found = [False] * len(keys)
        for tier in self.tiers:
            todo = [i for i, f in enumerate(found) if not f]
            if not todo:
                break
            answer = self._call(tier, "contains", [keys[i] for i in todo])
            for i, present in zip(todo, answer or ()):
                found[i] = found[i] or present
        held = self._held_writes  # on its way down, maybe evicted from cpu's index: still here
        return [f or k in held for f, k in zip(found, keys)]

    # ---------------------------------------------------------------- load
    def get(self, keys: Sequence[bytes]) -> list[ChunkRef | None]:
        """References to host slots holding each key's verified chunk; None for a miss.

        The caller releases every reference it gets. A hit below ``cpu`` is promoted.
        """
        with self._promote_lock:
            self._loads_running += 1
        try:
            return self._get(keys)
        finally:
            with self._promote_lock:
                self._loads_running -= 1
                self._promote_lock.notify_all()

    def _get(self, keys: Sequence[bytes]) -> list[ChunkRef | None]:
        t0 = time.perf_counter()
        refs: list[ChunkRef | None] = [None] * len(keys)
        missing = list(range(len(keys)))
        if self.cpu is not None:
            refs = self.cpu.acquire_many(keys)
            missing = [i for i, ref in enumerate(refs) if ref is None]
        if missing and self._held_writes:  # still being written down: served from its slot
            still = []
            for i in missing:
                refs[i] = self._held(keys[i])
                if refs[i] is None:
                    still.append(i)
            missing = still
        for depth, tier in enumerate(self.lower):
            if not missing:
                break
            slots: list[tuple[int, ChunkRef]] = []
            for i in missing:
                ref = self.allocate()
                if ref is None:
                    break  # host memory full of chunks in use: the rest are misses
                slots.append((i, ref))
            t_read = time.perf_counter()
            asked = [keys[i] for i, _ in slots]
            timed_as = tier.name + CACHED if asked and self._page_cached(tier, asked[0], asked[-1]) else tier.name
            answer = self._call(tier, "get_into", asked, [ref.data.numpy() for _, ref in slots],
                                nbytes=len(slots) * self.layout.nbytes, hold=[ref for _, ref in slots])
            answer = answer or [False] * len(slots)
            self.costs.observe_read(timed_as, sum(answer), time.perf_counter() - t_read)
            still = []
            for (i, ref), ok in zip(slots, answer):
                if ok:
                    refs[i] = ref
                    self._promote(keys[i], ref, self.lower[:depth])
                else:
                    ref.release()
                    still.append(i)
            missing = still + missing[len(slots):]
        self.metrics.observe_latency("store", "get", time.perf_counter() - t0)
        return refs

    def _promote(self, key: bytes, ref: ChunkRef, upper: Sequence[Tier]) -> None:
        if self.cpu is not None:
            self.cpu.insert(key, ref.share())
        if upper:
            self._enqueue(key, ref.share(), tuple(upper))

    # ---------------------------------------------------------------- promotion
    def promote_later(self, keys: Sequence[bytes]) -> int:
        """Copy ``keys`` up to the cpu tier in the background, in order, reading only while no load
        reads: a hit that was not worth loading from a slow tier is a fast one next time. Bounded
        (keys past :data:`_PROMOTE_QUEUE` waiting are not queued); returns how many were queued."""
        if self.cpu is None or not self.lower or self._closed:
            return 0
        with self._promote_lock:
            added = 0
            for key in keys:
                if key not in self._promote_queue and len(self._promote_queue) < _PROMOTE_QUEUE:
                    self._promote_queue[key] = None
                    added += 1
            if added and self._promoter is None:
                self._promoter = threading.Thread(target=self._promote_loop, name="kvtier-promote", daemon=True)
                self._promoter.start()
            self._promote_lock.notify_all()
        return added

    def pending_promotions(self) -> int:
        return len(self._promote_queue)

    def _promote_loop(self) -> None:
        while True:
            with self._promote_lock:
                while not self._closed and (not self._promote_queue or self._loads_running):
                    self._promote_lock.wait(0.5)
                if self._closed:
                    return
                batch = list(itertools.islice(self._promote_queue, _PROMOTE_BATCH))
            todo = [k for k, held in zip(batch, self.cpu.contains(batch)) if not held]
            try:
                refs = self._get(todo) if todo else []
            except Exception:  # never let the promoter die on a bug: drop the batch
                log.exception("kvtier: a background promotion failed")
                refs = []
            for ref in refs:
                if ref is not None:
                    ref.release()
            self.metrics.promoted_chunks.inc(sum(r is not None for r in refs))
            with self._promote_lock:
                for key in batch:
                    self._promote_queue.pop(key, None)

    # ---------------------------------------------------------------- save
    def allocate(self) -> ChunkRef | None:
        """A writable host slot for one chunk, or None when none can be freed."""
        if self.cpu is not None:
            return self.cpu.alloc()
        slot = self.pool.alloc()
        return None if slot is None else ChunkRef(self.pool, slot)

    def allocate_many(self, n: int) -> list[ChunkRef]:
        """Up to ``n`` writable slots (fewer when no more can be freed), for one step's saves."""
        if self.cpu is not None:
            return self.cpu.alloc_many(n)
        out = []
        for _ in range(n):
            slot = self.pool.alloc()
            if slot is None:
                break
            out.append(ChunkRef(self.pool, slot))
        return out

    def commit(self, key: bytes, ref: ChunkRef) -> None:
        """Publish the chunk the caller wrote into ``ref``; takes ownership of ``ref``.

        A key that is not bytes (or longer than 65,535 bytes) raises before anything is
        published (``ref`` is released)."""
        try:
            _check_key(key)
        except (TypeError, ValueError):
            ref.release()
            raise
        self.metrics.saved_chunks.inc()
        if self.cpu is not None:
            self.cpu.insert(key, ref.share())
        if self.lower:
            self._enqueue(key, ref, tuple(self.lower))
        else:
            ref.release()

    def put(self, key: bytes, payload: torch.Tensor | Buffer) -> bool:
        """Copy ``payload`` (``layout.nbytes`` bytes) into a slot and commit it; False if no slot.

        A payload of another size, or a bad key (see ``commit``), raises before any slot is taken.
        """
        _check_key(key)
        src = payload_bytes(payload, self.layout.nbytes)
        ref = self.allocate()
        if ref is None:
            return False
        copy_bytes(ref.data, src)
        self.commit(key, ref)
        return True

    def _enqueue(self, key: bytes, ref: ChunkRef, targets: tuple[Tier, ...]) -> None:
        """Write the chunk in ``ref`` to ``targets`` in the background; takes ownership of ``ref``.

        With room, and no older chunk waiting, its slot is pinned for a writer now. Otherwise the
        cpu tier, which indexes it, keeps it marked unwritten (the writers take such chunks in
        order as room frees up); only without a cpu tier is it dropped.
        """
        with self._wlock:
            if self._has_room() and not (self.cpu is not None and self.cpu.unwritten()):
                self._pin(self._new_write(key, ref, targets))
                return
            marked = self.cpu is not None and self.cpu.mark_unwritten(key, targets)
            if marked:
                self._feed()
        ref.release()
        if not marked:  # no cpu tier, or the chunk was already evicted from it (another thread's alloc)
            self._drop(DROP_NO_CPU_TIER if self.cpu is None else DROP_EVICTED_UNWRITTEN)

    def _new_write(self, key: bytes, ref: ChunkRef, targets: tuple[Tier, ...]) -> _Write:
        self._seq += 1  # under _wlock
        return _Write(self._seq, key, ref, tuple(targets))

    def _has_room(self) -> bool:
        """Whether one more write may pin a slot (under _wlock)."""
        return len(self._ready) + len(self._inflight) < self.queue_depth

    def _pin(self, w: _Write) -> None:
        """Hand ``w`` to the writer process, or queue it for the writer threads (under _wlock)."""
        self._held_writes[w.key] = w
        if self._process is not None and self._process.alive and self._submit(w):
            return
        self._ready.append(w)
        self._wlock.notify()

    def _feed(self) -> None:
        """Pin the oldest unwritten chunks of the cpu tier while there is room (under _wlock)."""
        while self.cpu is not None and self._has_room():
            item = self.cpu.take_unwritten()
            if item is None:
                return
            key, ref, targets = item
            self._pin(self._new_write(key, ref, targets))

    def _spill(self, key: bytes, ref: ChunkRef, targets: tuple[Tier, ...]) -> bool:
        """The cpu tier is evicting ``key`` before it was written down: queue it with its slot
        when there is room (True: ``ref`` taken), else count it lost (False: the tier frees it)."""
        with self._wlock:
            if self._has_room():
                self._pin(self._new_write(key, ref, targets))
                return True
        self._drop(DROP_EVICTED_UNWRITTEN)
        return False

    def _finish(self, w: _Write) -> None:
        """``w`` is written (or given up): free its slot, let the next waiting chunk in."""
        with self._wlock:
            self._inflight.pop(w.seq, None)
            if self._held_writes.get(w.key) is w:
                del self._held_writes[w.key]
            w.ref.release()
            self._feed()

    def _drop(self, reason: str, n: int = 1) -> None:
        if n:
            self.metrics.dropped_writes.inc(n)
            self._drops.labels(reason).inc(n)

    def _held(self, key: bytes) -> ChunkRef | None:
        """A new reference to ``key``'s chunk while a write holds its slot (waiting or being
        written), also after the cpu tier evicted it from its index; None otherwise. The caller
        releases it. Lets a read serve a chunk still on its way down instead of missing it."""
        with self._wlock:
            w = self._held_writes.get(key)
            return None if w is None else w.ref.share()

    def pending_writes(self) -> int:
        """Chunks not yet written to the lower tiers: pinned for a writer, or unwritten in ``cpu``."""
        with self._wlock:
            return self.pinned_writes() + (self.cpu.unwritten() if self.cpu is not None else 0)

    def pinned_writes(self) -> int:
        """Host slots held by writes now (never more than ``queue_depth``)."""
        return len(self._ready) + len(self._inflight)

    def publish_commits(self) -> bool:
        """Commits are indexed when made: every lookup through this store sees them at once."""
        return True

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every chunk saved so far reached the lower tiers; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.pending_writes():
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(0.001)
        return True

    # ------------------------------------------------ write-behind in a child process
    def _start_process(self, pool_fd: int, names: list[str]):
        import msgspec

        from kvtier.layout import layout_to_msg
        from kvtier.writer import WriterProcess

        spec = {"config": self.config.to_dict(), "label": self.label, "tiers": names,
                "layout": msgspec.to_builtins(layout_to_msg(self.layout)),
                "slot_bytes": self.pool.slot_bytes, "num_slots": self.pool.num_slots}
        try:
            return WriterProcess(spec, pool_fd, self._written, self._process_lost)
        except OSError as e:
            log.warning("kvtier: cannot start the writer process (%s); writing from this process", e)
            self._start_threads()
            return None

    def _submit(self, w: _Write) -> bool:
        """Send ``w`` to the writer process (under _wlock); False when it is gone."""
        self._inflight[w.seq] = w
        mask = sum(1 << self.lower.index(t) for t in w.targets)
        sent = False
        try:
            sent = self._process.submit(w.seq, w.ref.slot, mask, w.key)
        finally:
            if not sent:  # also when it raised: never a write nobody will finish (issue 29.8)
                del self._inflight[w.seq]
        return sent

    def _written(self, seq: int, stored: int) -> None:
        """The writer process finished chunk ``seq``; ``stored``: mask of the tiers that hold it."""
        with self._wlock:
            w = self._inflight.get(seq)
        if w is None:
            return
        self._finish(w)
        for tier in w.targets:  # the child's tier counted it there; count it where metrics look (cheap: no I/O)
            stats = tier.stats()
            if stored >> self.lower.index(tier) & 1:
                stats.puts += 1
                stats.bytes_written += self.layout.nbytes
            else:
                stats.errors += 1

    def _process_lost(self, reason: str) -> None:
        """The writer process is gone: release what it held (counted lost), write from this
        process from now on."""
        with self._wlock:
            held = list(self._inflight.values())  # threads start below: all of these are the child's
        if not self._closed:
            log.warning("kvtier: the writer process ended (%s); %d chunks it held are not written; "
                        "writing from this process from now on", reason, len(held))
            self._start_threads()
        for w in held:
            self._finish(w)
        self._drop(DROP_WRITER_LOST, len(held))

    # ------------------------------------------------ write-behind in threads
    def _start_threads(self) -> None:
        threads = [threading.Thread(target=self._write_behind, name=f"kvtier-writer-{i}", daemon=True)
                   for i in range(self.config.write_threads)]
        self._writers += threads
        for t in threads:
            t.start()

    def _stop_threads(self, timeout: float) -> None:
        """Stop the writer threads once the queue is empty (up to ``timeout``); what is left
        unwritten then is counted lost."""
        with self._wlock:
            self._stop_writers = True
            self._wlock.notify_all()
        for t in self._writers:
            t.join(timeout)
        with self._wlock:
            left, self._ready = list(self._ready), deque()
            for w in left:
                if self._held_writes.get(w.key) is w:
                    del self._held_writes[w.key]
                w.ref.release()
            unwritten = self.cpu.unwritten() if self.cpu is not None else 0
        self._drop(DROP_CLOSED, len(left) + unwritten)

    @property
    def writer(self) -> str:
        """Who writes to the lower tiers now: "process", "threads", or "none" (no lower tier)."""
        if self._process is not None and self._process.alive:
            return "process"
        return "threads" if self._writers else "none"

    def _next_write(self) -> _Write | None:
        """The oldest write waiting for a thread, now in flight; None when the threads stop."""
        with self._wlock:
            while not self._ready:
                if self._stop_writers:
                    return None
                self._wlock.wait()
            w = self._ready.popleft()
            self._inflight[w.seq] = w
            return w

    def _write_behind(self) -> None:
        while (w := self._next_write()) is not None:
            try:
                for tier in w.targets:
                    self._call(tier, "put", [w.key], [w.ref.data.numpy()], nbytes=self.layout.nbytes, hold=[w.ref])
            finally:
                self._finish(w)

    # ---------------------------------------------------------------- leases
    def lease(self, keys: Sequence[bytes]) -> Lease:
        """Keep ``keys`` from eviction (in tiers that evict) until released or ``lease_ttl_s``."""
        lease = Lease(self, keys)
        with self._lease_lock:
            self._expire_leases()
            self._leases[lease] = None
            for k in lease.keys:
                self._leased[k] = self._leased.get(k, 0) + 1
        return lease

    def _end_lease(self, lease: Lease) -> None:
        with self._lease_lock:
            self._drop_lease(lease)

    def _drop_lease(self, lease: Lease) -> None:
        if lease not in self._leases:
            return
        del self._leases[lease]
        for k in lease.keys:
            n = self._leased[k] - 1
            if n:
                self._leased[k] = n
            else:
                del self._leased[k]

    def _expire_leases(self) -> None:
        """Drop expired leases: the oldest first, stopping at the first live one (every lease has
        the same lifetime, so insertion order is expiry order): O(1) amortized per call."""
        now = time.monotonic()
        while self._leases:
            lease = next(iter(self._leases))
            if lease.expires >= now:
                break
            log.warning("kvtier: a lease on %d chunks expired before release", len(lease.keys))
            self._drop_lease(lease)

    def is_leased(self, key: bytes) -> bool:
        return key in self._leased

    # ---------------------------------------------------------------- misc
    def _call(self, tier: Tier, op: str, *args: object, nbytes: int = 0,
              hold: Sequence[ChunkRef] = ()) -> list | None:
        """``tier.op(*args)``, or None where the tier raised (a bug) or overran its deadline
        (:mod:`kvtier.tiers.calls`: ``hold``, the slots it writes into, stay held until it returns).
        While a call of the tier is hung, every call to it is None at once: its reads are skipped,
        so a lookup's hit there could not load either."""
        if self._deadlines.hung(tier.name):
            return None
        t0 = time.perf_counter()
        try:
            return self._deadlines.call_tier(tier, op, args, nbytes, hold)
        except Exception:  # a tier must not raise; if one does, it is a miss, not a crash
            log.exception("kvtier: tier %s raised in %s; treating as a miss", tier.name, op)
            self.metrics.tier_exceptions.labels(tier.name).inc()
            return None
        finally:
            self.metrics.observe_latency(tier.name, op, time.perf_counter() - t0)

    def close(self, timeout: float = 30.0) -> None:
        """Finish queued writes (up to ``timeout``), stop the writers, close the tiers."""
        if self._closed:
            return
        self._closed = True
        deadline = time.monotonic() + timeout

        def left() -> float:  # ``timeout`` is for all of close (each step had it whole: 2x with a stopped child)
            return max(0.1, deadline - time.monotonic())

        with self._promote_lock:
            self._promote_lock.notify_all()
        self.flush(timeout)
        if self._promoter is not None:
            self._promoter.join(left())
        if self._process is not None:
            self._process.close(left())
        self._stop_threads(left())
        self._deadlines.close()
        for tier in self.tiers:
            tier.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_registry: dict[tuple, Store] = {}
_registry_lock = threading.Lock()


def get_store(config: KVTierConfig, layout: ChunkLayout, label: str = "") -> "Store":
    """The process-wide store for this config and layout, created on first use.

    Lets the scheduler-side and worker-side halves of an engine adapter, living in
    one process, share one store (and one cpu tier). An adapter whose config names a
    `kvtier serve` process uses :func:`kvtier.server.client.get_remote_store` instead.
    """
    key = (repr(config.to_dict()), layout, label)
    with _registry_lock:
        store = _registry.get(key)
        if store is None or store._closed:
            store = _registry[key] = Store(config, layout, label)
        return store
