"""`RemoteStore`: the store API an engine adapter uses, served by a `kvtier serve` process.

Drop-in for :class:`kvtier.store.Store` where the connector needs it: ``lookup``,
``contains``, ``get`` (references whose ``.data`` is a uint8 view of the shared slot),
``allocate`` / ``commit`` / ``put``, ``lease``, ``flush``, ``close``, ``metrics``,
``layout``, ``chunk_size``.

Failure model: the server being down, slow, restarting or refusing a request never
raises here. Lookups answer 0, ``get`` answers misses, ``allocate`` answers None (the
save is skipped). A background thread pings the server (keeping this client's session
and its slot references alive) and reconnects once it is back, remapping the shared
memory if the server restarted. References from an earlier session are dead: their
``release`` does nothing and their ``commit`` is dropped. The background thread makes no
CUDA call: a region it maps is pinned by the next ``get`` or ``allocate``, on a thread that
loads or saves (a ``cudaHostRegister`` on another thread during vLLM's CUDA graph capture at
start-up breaks the capture and the engine dies).

A reference's :meth:`RemoteRef.valid` tells whether the server still holds the slot for
this client (the slot's generation in shared memory is unchanged): call it *after*
copying out of ``.data`` and treat ``False`` as a miss. It only turns False if this
process stalled past the server's client timeout and the slot was reused.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Sequence
from urllib.parse import urlparse

import msgspec
import numpy as np
import torch
import zmq

from kvtier.config import KVTierConfig
from kvtier.hostcopy import copy_bytes
from kvtier.layout import ChunkLayout, payload_bytes
from kvtier.metrics import Metrics
from kvtier.server import protocol as P
from kvtier.server.shm import SharedRegion

log = logging.getLogger(__name__)

# How long the constructor's Hello may take once the server answered a ping: its first Hello opens the store.
HELLO_WAIT_MS = 60_000


class RemoteRef:
    """One reference to a shared slot, like :class:`kvtier.memory.ChunkRef`."""

    __slots__ = ("_store", "slot", "gen", "epoch", "_data", "_released")

    def __init__(self, store: "RemoteStore", slot: int, gen: int, epoch: int, data: torch.Tensor) -> None:
        self._store = store
        self.slot = slot
        self.gen = gen
        self.epoch = epoch
        self._data = data
        self._released = False

    @property
    def data(self) -> torch.Tensor:
        if self._released:
            raise RuntimeError("RemoteRef used after release")
        return self._data

    def valid(self) -> bool:
        """Whether the slot is still this reference's (check after reading; False means a miss)."""
        return self._store._still_valid(self)

    def release(self) -> None:
        if self._released:
            raise RuntimeError("RemoteRef released twice")
        self._released = True
        self._store._release(self)

    def __enter__(self) -> "RemoteRef":
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._released:
            self.release()


class RemoteLease:
    __slots__ = ("_store", "ids", "epoch", "released")

    def __init__(self, store: "RemoteStore", ids: list[int], epoch: int) -> None:
        self._store = store
        self.ids = ids
        self.epoch = epoch
        self.released = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            if self.ids:
                self._store._one_way(P.Unlease(ids=self.ids), self.epoch)

    def __enter__(self) -> "RemoteLease":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class RemoteStore:
    """The store of a `kvtier serve` process at ``config.server``."""

    def __init__(self, config: KVTierConfig, layout: ChunkLayout, label: str = "",
                 metrics: Metrics | None = None, address: str | None = None, pin: bool | None = None,
                 connect: bool = True, reserve: int = 8) -> None:
        """``reserve``: slots fetched per Allocate round trip and kept for the next saves (1 = none kept)."""
        self.config = config
        self.layout = layout
        self.chunk_size = layout.tokens
        self.label = label
        self.address = address or config.server
        if not self.address:
            raise ValueError("RemoteStore needs a server address (config.server)")
        self.metrics = metrics or Metrics()
        self._pin = torch.cuda.is_available() if pin is None else pin
        self._timeout_ms = int(config.op_timeout_s * 1000)
        self._connect_ms = int(config.connect_timeout_s * 1000)
        self._lock = threading.RLock()
        self._rids = itertools.count(1)
        self._releases: deque[tuple[int, int]] = deque()  # (epoch, slot) waiting to be sent
        self._reserve_n = max(1, reserve)
        self._reserve: list[RemoteRef] = []  # allocated, not yet handed out
        self._ctx: zmq.Context | None = None
        self._sock: zmq.Socket | None = None
        self._pid = os.getpid()
        self._client = 0
        self._epoch = 0
        self._region: SharedRegion | None = None
        self._pin_due = False  # the region was mapped by the background thread and is not pinned yet
        self._unpin_due: list[SharedRegion] = []  # regions of a server that restarted, still pinned
        self._welcome: P.Welcome | None = None
        self._retry_at = 0.0
        self._last_sent = 0.0
        self._heartbeat_s = 1.0
        self._closed = False
        self._wake = threading.Event()
        self.errors = 0
        self.reconnects = 0
        if connect:
            with self._lock:
                self._connect(foreground=True)
        self._thread = threading.Thread(target=self._background, name="kvtier-remote", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------- connection
    @property
    def connected(self) -> bool:
        return self._client != 0

    def _reset_socket(self) -> None:
        if self._sock is not None:
            self._sock.close(0)
            self._sock = None

    def _drop_session(self) -> None:
        """Forget the session: every reference and lease of it becomes dead."""
        self._client = 0
        self._epoch += 1
        self._releases.clear()
        self._reserve.clear()

    def _connect(self, foreground: bool) -> bool:
        """Open a session (caller holds the lock); False (and retry later) when the server does not answer.
        ``foreground``: the caller's thread at start-up, which waits for a Hello that opens the server's
        store and pins a newly mapped region now. The background thread does neither: it holds the lock
        that lookups take, and a CUDA call there could break a capture (:meth:`_pin_for_copies`)."""
        if self._pid != os.getpid():  # forked: the parent's socket and context are not ours
            self._ctx, self._sock, self._pid = None, None, os.getpid()
            self._drop_session()
        self._reset_socket()
        self._retry_at = time.monotonic() + self.config.retry_after_s
        u = urlparse(self.address)
        if u.scheme == "ipc" and not os.path.exists(u.path):
            return False  # nobody listening: fail now instead of after a timeout
        if self._ctx is None:
            self._ctx = zmq.Context()
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, P.HARD_MESSAGE_BYTES)
        sock.setsockopt(zmq.SNDTIMEO, self._timeout_ms)
        sock.connect(self.address)
        self._sock = sock
        hello = P.Hello(label=self.label, layout=P.layout_to_msg(self.layout), token=self.config.server_token,
                        pid=os.getpid())
        # A live server answers a ping at once; its first Hello opens the store, reserving the shared
        # memory (seconds for tens of GiB), so at start-up the Hello may take longer than connect_timeout_s.
        if not isinstance(self._roundtrip(P.Ping(), self._connect_ms), P.Ok):
            self._reset_socket()
            return False
        rep = self._roundtrip(hello, max(self._connect_ms, HELLO_WAIT_MS) if foreground else self._connect_ms)
        if not isinstance(rep, P.Welcome):
            if isinstance(rep, P.Error):
                log.error("kvtier: server %s refused this client: %s (%s)", self.address, rep.message, rep.code)
            self._reset_socket()
            return False
        if rep.layout is None or P.layout_from_msg(rep.layout) != self.layout or rep.slot_bytes != self.layout.nbytes:
            log.error("kvtier: server %s serves another layout; not using it", self.address)
            self._reset_socket()
            return False
        try:
            if self._region is None or self._region.server_id != rep.server_id:
                region = SharedRegion.open(rep.shm_path)
                if region.server_id != rep.server_id or region.slot_bytes != rep.slot_bytes:
                    raise ValueError("shared region does not match the server's description")
                old, self._region = self._region, region
                if old is not None:
                    self._unpin_due.append(old)  # old references keep the old mapping alive; they are dead anyway
                self._pin_due = self._pin
                if foreground:
                    self._pin_for_copies()
        except (OSError, ValueError) as e:
            log.error("kvtier: cannot map the server's shared memory %s: %s", rep.shm_path, e)
            self._reset_socket()
            return False
        self._welcome = rep
        self._client = rep.client
        self._epoch += 1
        self._heartbeat_s = max(0.05, rep.heartbeat_s)
        self.reconnects += 1
        return True

    def _roundtrip(self, req: P._Req, timeout_ms: int) -> P.Reply | None:
        """Send ``req`` and wait for its reply (lock held). None on timeout or transport error."""
        rid = next(self._rids)
        req.rid = rid
        try:
            self._sock.send(P.encode(req))
            self._last_sent = time.monotonic()
            deadline = time.monotonic() + timeout_ms / 1000
            while True:
                left = int((deadline - time.monotonic()) * 1000)
                if left <= 0 or not self._sock.poll(left):
                    return None
                rep = P.decode_reply(self._sock.recv())
                if rep.rid == rid:
                    return rep
        except (zmq.ZMQError, msgspec.DecodeError, msgspec.ValidationError) as e:
            log.debug("kvtier: transport error talking to %s: %s", self.address, e)
            return None

    def _request(self, req: P._Req) -> P.Reply | None:
        """Send ``req`` in the current session; None (a miss) when there is none or the server fails."""
        with self._lock:
            if self._closed:
                return None
            if not self._client or self._pid != os.getpid():
                return None  # the background thread reconnects; the hot path never waits for it
            self._flush_releases()
            req.client = self._client
            rep = self._roundtrip(req, self._timeout_ms)
            if rep is None:
                log.warning("kvtier: server %s did not answer %s; treating as a miss until it is back",
                            self.address, type(req).__name__)
                self.errors += 1
                self._reset_socket()
                self._drop_session()
                self._retry_at = time.monotonic() + self.config.retry_after_s
                self._wake.set()
                return None
            if isinstance(rep, P.Error):
                self.errors += 1
                if rep.code == "unknown_client":  # the server expired us (or restarted at the same address)
                    self._drop_session()
                    self._retry_at = 0.0
                    self._wake.set()
                else:
                    log.warning("kvtier: server error on %s: %s (%s)", type(req).__name__, rep.message, rep.code)
                return None
            return rep

    def _one_way(self, req: P._Req, epoch: int) -> None:
        with self._lock:
            if self._closed or epoch != self._epoch or not self._client or self._sock is None:
                return
            req.client = self._client
            req.rid = 0
            try:
                self._sock.send(P.encode(req))  # blocks at most SNDTIMEO (a stalled server's full queue)
            except zmq.ZMQError as e:
                log.warning("kvtier: cannot send %s to %s (%s); reconnecting", type(req).__name__, self.address, e)
                self.errors += 1
                self._reset_socket()
                self._drop_session()  # the server releases what this session held when it times out
                self._retry_at = time.monotonic() + self.config.retry_after_s
                self._wake.set()

    def _flush_releases(self) -> None:
        slots = []
        while self._releases:
            epoch, slot = self._releases.popleft()
            if epoch == self._epoch:
                slots.append(slot)
        for i in range(0, len(slots), P.MAX_KEYS):
            self._one_way(P.Release(slots=slots[i:i + P.MAX_KEYS]), self._epoch)

    def _background(self) -> None:
        """Send batched releases, ping when idle, reconnect when the server is back."""
        while not self._closed:
            self._wake.wait(0.05)
            self._wake.clear()
            if self._closed:
                return
            now = time.monotonic()
            if not self._client:
                if now >= self._retry_at and self._lock.acquire(timeout=0.5):
                    try:
                        if not self._closed and not self._client:
                            if self._connect(foreground=False):
                                log.info("kvtier: connected to server %s", self.address)
                    finally:
                        self._lock.release()
                continue
            if self._releases or now - self._last_sent > self._heartbeat_s:
                if self._lock.acquire(timeout=0.5):
                    try:
                        if self._releases:
                            self._flush_releases()
                        if self._client and time.monotonic() - self._last_sent > self._heartbeat_s:
                            self._request(P.Ping())
                    finally:
                        self._lock.release()

    def _pin_for_copies(self) -> None:
        """Pin the mapped region before its slots are handed out for copies (lock held), and unpin
        those of a server that restarted. On the threads that load and save only (see the module doc)."""
        if self._pin_due and self._region is not None:
            self._pin_due = False
            self._region.pin()
        while self._unpin_due:
            self._unpin_due.pop().unpin()

    def wait_connected(self, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._client:
                return True
            self._retry_at = 0.0
            self._wake.set()
            time.sleep(0.02)
        return bool(self._client)

    # ---------------------------------------------------------------- references
    def _ref(self, slot: int, gen: int, epoch: int) -> RemoteRef:
        return RemoteRef(self, slot, gen, epoch, self._region.slot(slot))

    def _release(self, ref: RemoteRef) -> None:
        if ref.epoch == self._epoch:
            self._releases.append((ref.epoch, ref.slot))
            if len(self._releases) >= 256:
                self._wake.set()

    def _still_valid(self, ref: RemoteRef) -> bool:
        region = self._region
        return (ref.epoch == self._epoch and region is not None and ref.slot < region.num_slots
                and region.generation(ref.slot) == ref.gen)

    # ---------------------------------------------------------------- store API
    @property
    def tiers(self) -> list:
        """No tier lives in this process (the server's are in its stats)."""
        return []

    def lookup(self, keys: Sequence[bytes]) -> int:
        """Number of leading ``keys`` held by the server's tiers; 0 when it is unreachable."""
        t0 = time.perf_counter()
        keys = list(keys[:P.MAX_KEYS])
        rep = self._request(P.Lookup(keys=keys)) if keys else None
        n = rep.n if isinstance(rep, P.Count) else 0
        m = self.metrics
        m.lookups.inc()
        m.hit_tokens.inc(n * self.chunk_size)
        m.miss_tokens.inc((len(keys) - n) * self.chunk_size)
        m.observe_latency("server", "lookup", time.perf_counter() - t0)
        return n

    def contains(self, keys: Sequence[bytes]) -> list[bool]:
        out: list[bool] = []
        for i in range(0, len(keys), P.MAX_KEYS):
            part = list(keys[i:i + P.MAX_KEYS])
            rep = self._request(P.Contains(keys=part))
            ok = isinstance(rep, P.Bools) and len(rep.values) == len(part)
            out += rep.values if ok else [False] * len(part)
        return out

    def get(self, keys: Sequence[bytes]) -> list[RemoteRef | None]:
        """References to shared slots holding each key's chunk; None for a miss. Release each one."""
        t0 = time.perf_counter()
        out: list[RemoteRef | None] = []
        for i in range(0, len(keys), P.MAX_KEYS):
            part = list(keys[i:i + P.MAX_KEYS])
            with self._lock:
                epoch = self._epoch + 0
                rep = self._request(P.Get(keys=part))
                if isinstance(rep, P.Slots) and len(rep.slots) == len(part) and self._epoch == epoch:
                    self._pin_for_copies()
                    out += [None if s < 0 else self._ref(s, g, epoch) for s, g in zip(rep.slots, rep.gens)]
                else:
                    out += [None] * len(part)
        self.metrics.observe_latency("server", "get", time.perf_counter() - t0)
        return out

    def allocate_many(self, n: int) -> list[RemoteRef]:
        """Up to ``n`` writable slots (fewer when the server has no room)."""
        out: list[RemoteRef] = []
        while n > 0:
            k = min(n, P.MAX_KEYS)
            with self._lock:
                epoch = self._epoch
                rep = self._request(P.Allocate(n=k))
                if not isinstance(rep, P.Slots) or self._epoch != epoch:
                    break
                self._pin_for_copies()
                out += [self._ref(s, g, epoch) for s, g in zip(rep.slots, rep.gens)]
            if len(rep.slots) < k:
                break
            n -= k
        return out

    def allocate(self) -> RemoteRef | None:
        """A writable shared slot for one chunk, or None (server down or full: skip the save).

        Slots come ``reserve`` per round trip; the spare ones wait here for the next saves.
        """
        with self._lock:
            if self._reserve and self._reserve[-1].epoch != self._epoch:
                self._reserve.clear()
            if not self._reserve:
                self._reserve = self.allocate_many(self._reserve_n)[::-1]
            return self._reserve.pop() if self._reserve else None

    def commit_many(self, keys: Sequence[bytes], refs: Sequence[RemoteRef], wait: bool = False) -> int:
        """Publish filled slots; takes ownership of ``refs``.

        ``wait=False`` (the save path): sent without waiting; the server applies commits in
        order, before any later request of this client. Returns how many were sent. ``wait=True``:
        returns how many the server accepted, and every client sees them once this returns.
        """
        if len(keys) != len(refs):
            raise ValueError(f"{len(keys)} keys but {len(refs)} refs")
        done = 0
        with self._lock:
            live = [(k, r) for k, r in zip(keys, refs) if r.epoch == self._epoch and not r._released]
            for r in refs:
                r._released = True  # ownership passed: to the server, or dropped with a dead session
            for i in range(0, len(live), P.MAX_KEYS):
                part = live[i:i + P.MAX_KEYS]
                msg = P.Commit(keys=[k for k, _ in part], slots=[r.slot for _, r in part], noreply=not wait)
                if wait:
                    rep = self._request(msg)
                    done += rep.n if isinstance(rep, P.Count) else 0
                elif self._client:
                    self._flush_releases()
                    self._one_way(msg, self._epoch)
                    self._last_sent = time.monotonic()
                    done += len(part)
        self.metrics.saved_chunks.inc(done)
        return done

    def commit(self, key: bytes, ref: RemoteRef) -> None:
        """Publish the chunk written into ``ref`` (without waiting); takes ownership of ``ref``."""
        self.commit_many([key], [ref])

    def put(self, key: bytes, payload: torch.Tensor | memoryview | np.ndarray) -> bool:
        """Copy ``payload`` into a slot and commit it; True once the server accepted it (visible to all).

        A payload of another size than the layout's chunk raises ValueError before any slot is taken.
        """
        src = payload_bytes(payload, self.layout.nbytes)
        ref = self.allocate()
        if ref is None:
            return False
        copy_bytes(ref.data, src)
        return self.commit_many([key], [ref], wait=True) == 1

    def lease(self, keys: Sequence[bytes]) -> RemoteLease:
        """Keep ``keys`` from eviction on the server until released (or its lease_ttl_s)."""
        with self._lock:
            epoch = self._epoch
            rep = self._request(P.Lease(keys=list(keys[:P.MAX_KEYS])))
        ids = rep.ids if isinstance(rep, P.Ids) else []
        return RemoteLease(self, ids, epoch)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until the server's write-behind queue drained; False on timeout or when unreachable."""
        t = 30.0 if timeout is None else min(timeout, 3600.0)
        with self._lock:
            saved, self._timeout_ms = self._timeout_ms, max(self._timeout_ms, int(t * 1000) + 1000)
            try:
                rep = self._request(P.Flush(timeout_s=t))
            finally:
                self._timeout_ms = saved
        return isinstance(rep, P.Count) and rep.n == 1

    def stats(self) -> dict[str, float]:
        rep = self._request(P.Stats())
        return dict(rep.values) if isinstance(rep, P.StatsReply) else {}

    def ping(self) -> bool:
        """A round trip. The server handles a client's messages in order, so the one-way commits
        sent before it are applied, and seen by every client, once it returns True."""
        return isinstance(self._request(P.Ping()), P.Ok)

    def publish_commits(self) -> bool:
        """Make the commits sent so far visible to every client: one :meth:`ping`."""
        return self.ping()

    def close(self, timeout: float = 1.0) -> None:
        if self._closed:
            return
        with self._lock:
            if self._client:
                self._flush_releases()
                self._roundtrip(P.Bye(client=self._client), int(timeout * 1000))
            self._closed = True
            self._drop_session()
            self._reset_socket()
            for region in [self._region, *self._unpin_due]:
                if region is not None:
                    region.unpin()
            self._unpin_due.clear()
        self._wake.set()
        self._thread.join(timeout)
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None

    def __enter__(self) -> "RemoteStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_registry: dict[tuple, RemoteStore] = {}
_registry_lock = threading.Lock()


def get_remote_store(config: KVTierConfig, layout: ChunkLayout, label: str = "") -> RemoteStore:
    """The process-wide client for ``config.server`` and ``layout`` (like :func:`kvtier.store.get_store`)."""
    key = (config.server, config.server_token, layout, label, os.getpid())
    with _registry_lock:
        store = _registry.get(key)
        if store is None or store._closed:
            store = _registry[key] = RemoteStore(config, layout, label)
        return store
