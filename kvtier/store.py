"""The store: one object over the tiers, the only thing engines talk to.

- ``lookup`` answers how many leading chunk keys some tier holds: one batched
  ``contains`` per tier, asking each tier only about keys the faster tiers lacked.
- ``get`` hands out references to host slots holding verified chunks; a hit in a
  lower tier is read into a fresh slot and promoted to ``cpu`` (and written back to
  the tiers between, so the next reader finds it closer).
- ``allocate`` + ``commit`` is the save path: the engine fills a slot, the store
  indexes it in ``cpu`` and queues it for the lower tiers. Background threads drain
  that bounded queue; when it is full a write is dropped and counted, never blocking
  the engine.
- ``lease`` keeps chunks found by a lookup from eviction until their load is done.

A tier that raises (a bug: tiers are meant to answer misses) is counted and
treated as a miss, so the serving process never dies because a tier did.
"""

from __future__ import annotations

import itertools
import logging
import os
import queue
import threading
import time
from collections.abc import Sequence

import torch

from kvtier.config import KVTierConfig
from kvtier.costs import CostModel
from kvtier.hostcopy import copy_bytes
from kvtier.layout import ChunkLayout, payload_bytes
from kvtier.memory import ChunkRef, HostPool
from kvtier.metrics import Metrics
from kvtier.tiers.base import Buffer, Protected, Tier
from kvtier.tiers.cpu import CpuTier

log = logging.getLogger(__name__)

# Without a cpu tier the pool only stages chunks on their way to or from a lower tier.
_STAGING_SLOTS = 64
# Chunks a background promotion reads per batch, and at most this many keys wait for one.
_PROMOTE_BATCH = 8
_PROMOTE_QUEUE = 4096
# At most 1/_QUEUE_SHARE of the host slots wait in the write-behind queue (see Store.__init__).
_QUEUE_SHARE = 2


def resolve_writer(config: KVTierConfig) -> str:
    """``config.writer`` with "auto" decided: a child process when CUDA is present (an engine
    on a GPU, whose thread must not wait for the GIL behind disk writes), threads otherwise."""
    if config.writer != "auto":
        return config.writer
    return "process" if torch.cuda.is_available() else "threads"


def make_tier(name: str, config: KVTierConfig, layout: ChunkLayout, label: str, protected: Protected) -> Tier:
    """Build the lower tier ``name`` ("disk" or "redis") from ``config``."""
    if name == "disk":
        from kvtier.tiers.disk import DiskTier

        return DiskTier(config.disk_path, config.disk_bytes, layout, label=label, protected=protected)
    if name == "redis":
        from kvtier.tiers.redis import RedisTier

        return RedisTier(
            config.redis_url, layout, label=label, cluster=config.redis_cluster, prefix=config.redis_prefix,
            ttl_s=config.redis_ttl_s, connect_timeout_s=config.connect_timeout_s,
            op_timeout_s=config.op_timeout_s, retry_after_s=config.retry_after_s,
        )
    raise ValueError(f"no tier named {name!r}")


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
            self.cpu: CpuTier | None = CpuTier(self.pool, protected=self.is_leased)
        else:
            self.pool = pool or HostPool(layout.nbytes, _STAGING_SLOTS, pin)
            self.cpu = None
        if tiers is None:
            tiers = [make_tier(n, config, layout, label, self.is_leased) for n in lower_names]
        self.lower: list[Tier] = list(tiers)
        self.tiers: list[Tier] = ([self.cpu] if self.cpu else []) + self.lower
        self.metrics.watch_tiers(lambda: self.tiers)
        # Each queued write pins its host slot until a writer is done with it. Bounded by a share
        # of the pool, not by write_queue_depth alone: a lower tier slower than the puts must
        # never pin the slots the cpu tier needs for new chunks and for reads from lower tiers
        # (with 32 MiB chunks, 4 GiB holds only 128). Past the bound, writes are dropped (counted).
        self.queue_depth = max(1, min(config.write_queue_depth, self.pool.num_slots // _QUEUE_SHARE))
        self._queue: queue.Queue[tuple[bytes, ChunkRef, tuple[Tier, ...]] | None] = queue.Queue(
            self.queue_depth
        )
        self._writers: list[threading.Thread] = []
        # Chunks the writer process has (seq -> slot reference and target tiers), under _sent_lock.
        self._sent: dict[int, tuple[ChunkRef, tuple[Tier, ...]]] = {}
        self._sent_lock = threading.Lock()
        self._seq = 0
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

    def locate(self, keys: Sequence[bytes]) -> list[str]:
        """The name of the fastest tier holding each leading key, up to the first key none holds."""
        t0 = time.perf_counter()
        n = len(keys)
        where: list[str | None] = [None] * n
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
        return found

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
            missing = []
            for i, key in enumerate(keys):
                refs[i] = self.cpu.acquire(key)
                if refs[i] is None:
                    missing.append(i)
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
            answer = self._call(tier, "get_into", [keys[i] for i, _ in slots],
                                [ref.data.numpy() for _, ref in slots]) or [False] * len(slots)
            self.costs.observe_read(tier.name, sum(answer), time.perf_counter() - t_read)
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

    def commit(self, key: bytes, ref: ChunkRef) -> None:
        """Publish the chunk the caller wrote into ``ref``; takes ownership of ``ref``."""
        self.metrics.saved_chunks.inc()
        if self.cpu is not None:
            self.cpu.insert(key, ref.share())
        if self.lower:
            self._enqueue(key, ref, tuple(self.lower))
        else:
            ref.release()

    def put(self, key: bytes, payload: torch.Tensor | Buffer) -> bool:
        """Copy ``payload`` (``layout.nbytes`` bytes) into a slot and commit it; False if no slot.

        A payload of another size raises ValueError before any slot is taken.
        """
        src = payload_bytes(payload, self.layout.nbytes)
        ref = self.allocate()
        if ref is None:
            return False
        copy_bytes(ref.data, src)
        self.commit(key, ref)
        return True

    def _enqueue(self, key: bytes, ref: ChunkRef, targets: tuple[Tier, ...]) -> None:
        if self._process is not None and self._send(key, ref, targets):
            return
        try:
            self._queue.put_nowait((key, ref, targets))
        except queue.Full:
            self.metrics.dropped_writes.inc()
            ref.release()

    # ------------------------------------------------ write-behind in a child process
    def _start_process(self, pool_fd: int, names: list[str]):
        import msgspec

        from kvtier.server.protocol import layout_to_msg
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

    def _send(self, key: bytes, ref: ChunkRef, targets: tuple[Tier, ...]) -> bool:
        """Hand the chunk to the writer process; False when it is gone (the caller writes it here)."""
        mask = sum(1 << self.lower.index(t) for t in targets)
        with self._sent_lock:
            if len(self._sent) >= self.queue_depth:  # as with a full queue: dropped, counted
                self.metrics.dropped_writes.inc()
                ref.release()
                return True
            self._seq += 1
            seq = self._seq
            self._sent[seq] = (ref, targets)
        if self._process.submit(seq, ref.slot, mask, key):
            return True
        with self._sent_lock:
            self._sent.pop(seq, None)
        return False

    def _written(self, seq: int, stored: int) -> None:
        """The writer process finished chunk ``seq``; ``stored``: mask of the tiers that hold it."""
        with self._sent_lock:
            item = self._sent.pop(seq, None)
        if item is None:
            return
        ref, targets = item
        ref.release()
        for tier in targets:  # the child's tier counted it there; count it where metrics look (cheap: no I/O)
            stats = tier.stats()
            if stored >> self.lower.index(tier) & 1:
                stats.puts += 1
                stats.bytes_written += self.layout.nbytes
            else:
                stats.errors += 1

    def _process_lost(self, reason: str) -> None:
        """The writer process is gone: release what it held, write from this process from now on."""
        if not self._closed:
            log.warning("kvtier: the writer process ended (%s); %d chunks it held are not written; "
                        "writing from this process from now on", reason, len(self._sent))
            self._start_threads()
        with self._sent_lock:
            held, self._sent = list(self._sent.values()), {}
        for ref, _ in held:
            ref.release()

    def _start_threads(self) -> None:
        threads = [threading.Thread(target=self._write_behind, name=f"kvtier-writer-{i}", daemon=True)
                   for i in range(self.config.write_threads)]
        self._writers += threads
        for t in threads:
            t.start()

    @property
    def writer(self) -> str:
        """Who writes to the lower tiers now: "process", "threads", or "none" (no lower tier)."""
        if self._process is not None and self._process.alive:
            return "process"
        return "threads" if self._writers else "none"

    def pending_writes(self) -> int:
        """Chunks queued for the lower tiers and not yet written."""
        return self._queue.unfinished_tasks + len(self._sent)

    def _write_behind(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                key, ref, targets = item
                with ref:
                    for tier in targets:
                        self._call(tier, "put", [key], [ref.data.numpy()])
            finally:
                self._queue.task_done()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until queued writes reached the lower tiers; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._queue.unfinished_tasks or self._sent:
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(0.001)
        return True

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
    def _call(self, tier: Tier, op: str, *args: object) -> list | None:
        t0 = time.perf_counter()
        try:
            return getattr(tier, op)(*args)
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
        with self._promote_lock:
            self._promote_lock.notify_all()
        self.flush(timeout)
        if self._promoter is not None:
            self._promoter.join(timeout)
        if self._process is not None:
            self._process.close(timeout)
        for _ in self._writers:
            self._queue.put(None)
        for t in self._writers:
            t.join(timeout)
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
