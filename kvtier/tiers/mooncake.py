"""The mooncake tier: chunks in a Mooncake Store pool (``pip install 'kvtier[mooncake]'``).

A Mooncake Store is a master (the object index, ``mooncake_master``) and *segments*: memory
that clients mount into the pool, on any host. A value moves in one transfer (TCP or RDMA)
between a segment and the reader's or writer's own memory, without a copy through Python.

Value: the 256-byte header of :mod:`kvtier.layout` followed by the payload, as in the disk
and Redis tiers, so a reader checks layout, key and checksum. The header and the payload
travel as two buffers of one object (``batch_put_from_multi_buffers`` /
``batch_get_into_multi_buffers``): the payload goes straight from / into the caller's host
slot. Host memory the store hands out (the slot pool) is registered with Mooncake once
(:meth:`MooncakeTier.register_memory`); any other buffer is registered for the one call.
Object name: ``prefix + hex(chunk key)``; namespaces are in the chunk keys already.

Failures are misses: ``contains``/``get_into`` answer False, ``put`` False, each kind of
failure logged once per ``retry_after_s`` in one line. A lost master (RPC failures) opens a
circuit breaker: the tier answers without calling Mooncake (whose calls to a lost master
block until ``MC_RPC_TIMEOUT_MS``) while a thread of the breaker's asks the master every
``retry_after_s`` (never a caller: that may be the engine's thread). Mooncake's client reconnects
and mounts its segment again when the master is back. A lost segment holder makes the
objects in it fail to transfer (misses) until the master drops the segment (its
``client_ttl``). Connecting runs in a background thread, which calls Mooncake's ``setup``
only once the master's port accepts connections (``setup`` holds the GIL for as long as it
tries: 4.4 s against an absent master): the engine starts at once, answering misses until
connected.

A put replaces an existing object: Mooncake's put keeps the first value of a name, so the
name is removed first (a reader at that moment misses; one that reads a half-written value
fails its checksum: a miss).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np

from kvtier.hostcopy import copy_bytes
from kvtier.layout import HEADER_SIZE, ChunkLayout, CorruptChunk, decode_header, encode_header, verify
from kvtier.tiers.base import (SLOW_BYTES_PER_S, Buffer, StoredChunk, Tier, TierStats, as_bytes, chunk_views,
                               time_for_bytes)
from kvtier.tiers.breaker import Breaker

log = logging.getLogger(__name__)

NOT_FOUND = -704  # Mooncake's OBJECT_NOT_FOUND
RPC_CODES = range(-999, -899)  # RPC_FAIL and kin: the master did not answer
HEADER_SLOTS = 1024  # headers in the registered arena; a larger batch registers its own
LOG_EVERY_S = 10.0


def import_store(rpc_timeout_s: float = 2.0):
    """Mooncake's store module, or ImportError saying what to install. ``rpc_timeout_s``: how
    long a call to the master may take (``MC_RPC_TIMEOUT_MS`` unless set; the first tier made in
    a process sets it for all: Mooncake reads it once)."""
    # Mooncake logs every step at INFO to stderr (many lines per connection); keep its errors
    # only. MC_LOG_LEVEL=INFO in the environment shows all of it again.
    os.environ.setdefault("MC_LOG_LEVEL", "ERROR")
    # One attempt per setup call (Mooncake's default of 20 blocks ~85 s with the master down);
    # the tier's connecting thread retries on its own, and close() then waits for one attempt.
    os.environ.setdefault("MC_STORE_CLIENT_SETUP_RETRIES", "1")
    # A master whose host dropped off the network held each call 30 s (Mooncake's default RPC
    # timeout: a lookup on the engine's thread); with this, op_timeout_s (2.0 s measured at 2).
    os.environ.setdefault("MC_RPC_TIMEOUT_MS", str(max(1, round(rpc_timeout_s * 1000))))
    try:
        from mooncake import store
    except ImportError as e:
        raise ImportError(f"the mooncake tier needs Mooncake: pip install 'kvtier[mooncake]' "
                          f"(and the system library libibverbs1: apt-get install -y libibverbs1) ({e})") from e
    return store


def route_address(host: str, port: int) -> str:
    """This host's address on the route to ``host`` (what other clients reach its segment at)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((host, port))  # UDP: picks the route, sends nothing
            return s.getsockname()[0]
    except OSError:
        return "127.0.0.1"


def _address(buf: memoryview) -> int:
    return np.frombuffer(buf, dtype=np.uint8).ctypes.data if len(buf) else 0


class MooncakeTier(Tier):
    name = "mooncake"

    def __init__(self, master: str, layout: ChunkLayout, label: str = "", metadata_server: str = "",
                 protocol: str = "tcp", local_hostname: str = "", segment_bytes: int = 4 << 30,
                 buffer_bytes: int = 16 << 20, rdma_devices: str = "", prefix: str = "kvtier:",
                 admin_url: str = "", connect_timeout_s: float = 1.0, retry_after_s: float = 2.0,
                 wait_s: float = 10.0, op_timeout_s: float = 2.0, slow_bytes_per_s: float = SLOW_BYTES_PER_S) -> None:
        """``master``: HOST:PORT of mooncake_master. ``metadata_server``: its HTTP metadata URL
        (default ``http://HOST:8080/metadata``, the master's built-in server). ``segment_bytes``:
        memory this process adds to the pool (0: a pure client). ``buffer_bytes``: Mooncake's
        own transfer buffer. ``admin_url``: the master's admin HTTP server, for :meth:`scan`
        (default ``http://HOST:9003``). Waits up to ``wait_s`` for the first connection.
        ``op_timeout_s``: the longest call to the master (``MC_RPC_TIMEOUT_MS``); with
        ``slow_bytes_per_s``, the store's deadline for a read or write (:meth:`deadline`), as the
        redis tier's socket timeout."""
        self._mc = import_store(op_timeout_s)
        host, _, port = master.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"mooncake master {master!r}: expected HOST:PORT")
        self.master = master
        self.layout = layout
        self.label = label
        self.metadata_server = metadata_server or f"http://{host}:8080/metadata"
        self.protocol = protocol
        self.local_hostname = local_hostname or route_address(host, int(port))
        self.segment_bytes = int(segment_bytes)
        self.buffer_bytes = int(buffer_bytes)
        self.rdma_devices = rdma_devices
        self.prefix = prefix
        self.admin_url = admin_url or f"http://{host}:9003"
        self.retry_after_s = retry_after_s
        self.op_timeout_s = op_timeout_s
        self.slow_bytes_per_s = slow_bytes_per_s
        self._lock = threading.Lock()
        self._stats = TierStats("mooncake", capacity_bytes=self.segment_bytes)
        self._stats.extra.update(skipped=0, breaker_open=0, connected=0)
        self._breaker = Breaker(retry_after_s, probe=self._master_answers)
        self._logged: dict[str, float] = {}
        self._regions: list[tuple[int, int, object]] = []  # (start, end, owner) registered for good
        self._headers = np.zeros(HEADER_SLOTS * HEADER_SIZE, dtype=np.uint8)
        self._free_headers = list(range(HEADER_SLOTS))
        self._store = None  # set once connected
        self._closed = False
        self._connected = threading.Event()
        self._address = (host, int(port))
        self._connect_timeout_s = connect_timeout_s
        reachable = self._probe(host, int(port), connect_timeout_s)
        self._thread = threading.Thread(target=self._connect, name="kvtier-mooncake-setup", daemon=True)
        self._thread.start()
        if reachable:
            self._connected.wait(wait_s)
        if not self._connected.is_set():
            log.warning("mooncake tier: master %s not reached yet; answering misses until it is", master)

    # ---- connection -----------------------------------------------------------------------
    @staticmethod
    def _probe(host: str, port: int, timeout_s: float) -> bool:
        try:
            with socket.create_connection((host, port), timeout=timeout_s):
                return True
        except OSError:
            return False

    def _connect(self) -> None:
        """Set the client up (retrying while the master is away), then register memory."""
        while not self._closed:
            # Mooncake's setup holds the GIL while it tries (4.4 s against a master that is not
            # there), stalling every thread of the engine: call it only once the master listens.
            if not self._probe(*self._address, self._connect_timeout_s):
                self._log("setup", f"master {self.master} does not answer; retrying every {self.retry_after_s:.1f}s")
                time.sleep(self.retry_after_s)
                continue
            store = self._mc.MooncakeDistributedStore()
            rc = store.setup(self.local_hostname, self.metadata_server, self.segment_bytes, self.buffer_bytes,
                             self.protocol, self.rdma_devices, self.master)
            if rc == 0:
                with self._lock:
                    if self._closed:
                        store.close()
                        return
                    for start, end, _ in self._regions:
                        store.register_buffer(start, end - start)
                    store.register_buffer(self._headers.ctypes.data, self._headers.nbytes)
                    self._store = store  # callers see it only with its memory registered
                    self._stats.extra["connected"] = 1
                self._connected.set()
                log.info("mooncake tier: connected to master %s as %s (segment %d bytes, %s)", self.master,
                         self.local_hostname, self.segment_bytes, self.protocol)
                return
            self._log("setup", f"setup with master {self.master} / metadata {self.metadata_server} failed "
                               f"(rc={rc}); retrying every {self.retry_after_s:.1f}s")
            time.sleep(self.retry_after_s)

    def wait_connected(self, timeout_s: float) -> bool:
        """True once connected to the master (tests, benchmarks)."""
        return self._connected.wait(timeout_s)

    def register_memory(self, buffer: Buffer) -> None:
        """Register host memory that later calls pass slots of (the store's pool): transfers then
        go straight into and out of it, with no registration per call."""
        mv = as_bytes(buffer.numpy() if hasattr(buffer, "numpy") else buffer)
        start = _address(mv)
        with self._lock:
            if any(s <= start and start + len(mv) <= e for s, e, _ in self._regions):
                return
            self._regions.append((start, start + len(mv), buffer))  # keeps the memory alive
            if self._store is not None and self._store.register_buffer(start, len(mv)) != 0:
                log.warning("mooncake tier: registering %d bytes of host memory failed; "
                            "calls will register their buffers one by one", len(mv))
                self._regions.pop()

    def _registered(self, ptr: int, n: int) -> bool:
        return any(s <= ptr and ptr + n <= e for s, e, _ in self._regions)

    @contextmanager
    def _pinned(self, store, bufs: Sequence[memoryview]) -> Iterator[list[int]]:
        """Addresses of ``bufs``, each inside registered memory for the duration."""
        ptrs = [_address(b) for b in bufs]
        extra = {}
        for p, b in zip(ptrs, bufs):
            if not self._registered(p, len(b)) and p not in extra:
                if store.register_buffer(p, len(b)) == 0:
                    extra[p] = b
        try:
            yield ptrs
        finally:
            for p in extra:
                store.unregister_buffer(p)

    @contextmanager
    def _header_slots(self, store, n: int) -> Iterator[tuple[np.ndarray, list[int]]]:
        """``n`` header buffers of registered memory: a view of them and their addresses."""
        with self._lock:
            slots = [self._free_headers.pop() for _ in range(n)] if n <= len(self._free_headers) else None
        if slots is not None:
            base = self._headers.ctypes.data
            try:
                yield self._headers, [base + s * HEADER_SIZE for s in slots]
            finally:
                with self._lock:
                    self._free_headers.extend(slots)
            return
        own = np.zeros(n * HEADER_SIZE, dtype=np.uint8)  # a batch larger than the arena
        with self._pinned(store, [memoryview(own)]) as (base,):
            yield own, [base + i * HEADER_SIZE for i in range(n)]

    def _client(self, n: int):
        """The connected client, or None (counted as skipped) while not connected / breaker open."""
        store = self._store
        if store is not None and self._breaker.allow():
            # The client's own view of the master (its heartbeat), answered without a call: a
            # call to a master it has lost blocks for seconds.
            if store.health_check() == 0:
                return store
            self._master_lost("its health check failed")
        with self._lock:
            self._stats.extra["skipped"] += n
        return None

    def _master_answers(self) -> bool:
        """The breaker's probe, on its own thread (never a caller's: with the master's host cut
        off, each call waits out MC_RPC_TIMEOUT_MS): the client is healthy and one lookup is answered."""
        store = self._store
        if store is None or store.health_check() != 0:
            return False
        if any(c in RPC_CODES for c in store.batch_is_exist([self.prefix + "probe"])):
            return False
        log.info("mooncake tier: master %s answers again", self.master)
        return True

    def _answered(self, op: str, codes: Sequence[int]) -> None:
        """Close or open the breaker from one call's return codes; log failures (rate limited)."""
        failed = [c for c in codes if c in RPC_CODES]
        if failed:
            self._master_lost(f"{op}: rc={failed[0]}")
            return
        if self._breaker.is_open:
            log.info("mooncake tier: master %s answers again", self.master)
        self._breaker.success()
        other = [c for c in codes if c < 0 and c != NOT_FOUND]
        if other:
            self._log(f"{op}{other[0]}", f"{op} of {len(other)} chunk(s) failed (rc={other[0]}); "
                                         f"those are misses")

    def _master_lost(self, why: str) -> None:
        if not self._breaker.is_open:
            self._log("master", f"master {self.master} lost ({why}); answering misses, "
                                f"retrying every {self.retry_after_s:.1f}s")
        self._breaker.failure()
        with self._lock:
            self._stats.errors += 1

    def _log(self, kind: str, message: str) -> None:
        now = time.monotonic()
        if now - self._logged.get(kind, -LOG_EVERY_S) >= LOG_EVERY_S:
            self._logged[kind] = now
            log.warning("mooncake tier: %s", message)

    def _name(self, key: bytes) -> str:
        return self.prefix + key.hex()

    # ---- Tier -----------------------------------------------------------------------------
    def contains(self, keys: Sequence[bytes]) -> list[bool]:
        if not keys:
            return []
        store = self._client(len(keys))
        if store is None:
            return [False] * len(keys)
        codes = store.batch_is_exist([self._name(k) for k in keys])
        self._answered("contains", [c for c in codes if c < 0])
        return [c == 1 for c in codes]

    def deadline(self, op: str, nbytes: int) -> float | None:
        """Transfers take no timeout in Mooncake: a read from a holder whose host dropped off
        the network blocked 47-60 s (TCP connection attempts; none of Mooncake's TCP timeout
        settings shortened it). The store waits this long for a read or a write instead. A
        lookup only asks the master, whose calls ``MC_RPC_TIMEOUT_MS`` bounds (:func:`import_store`):
        it runs on the caller's thread, without the hand-off to another thread and back (two
        waits for the GIL: a p50 of 16 ms instead of 5 ms for a lookup beside a busy thread)."""
        if op == "contains":
            return None
        return time_for_bytes(nbytes, self.op_timeout_s, self.slow_bytes_per_s)

    def get_into(self, keys: Sequence[bytes], dests: Sequence[Buffer]) -> list[bool]:
        outs = chunk_views(keys, dests, self.layout.nbytes, "destination")
        if not keys:
            return []
        first = _first_of(keys)
        if len(first) < len(keys):
            # Mooncake transfers a name once per batch (into one of the buffers given for it):
            # ask for each key once, then copy to its other destinations.
            uniq = list(first.values())
            got = self.get_into([keys[i] for i in uniq], [outs[i] for i in uniq])
            hit = dict(zip(uniq, got))
            for i, key in enumerate(keys):
                j = first[key]
                if i != j and hit[j]:
                    copy_bytes(outs[i], outs[j])
            return [hit[first[k]] for k in keys]
        store = self._client(len(keys))
        if store is None:
            with self._lock:
                self._stats.misses += len(keys)
            return [False] * len(keys)
        n, size = len(keys), self.layout.nbytes
        names = [self._name(k) for k in keys]
        counts = dict.fromkeys(("hit", "error", "corrupt"), 0)
        result = []
        bad = []
        with self._header_slots(store, n) as (heads, hptrs), self._pinned(store, outs) as optrs:
            codes = store.batch_get_into_multi_buffers(names, [[h, o] for h, o in zip(hptrs, optrs)],
                                                       [[HEADER_SIZE, size]] * n)
            base = heads.ctypes.data
            for key, name, out, code, h in zip(keys, names, outs, codes, hptrs):
                status = self._read(key, code, heads[h - base:h - base + HEADER_SIZE], out)
                counts[status] = counts.get(status, 0) + 1
                result.append(status == "hit")
                if status == "corrupt":
                    bad.append(name)
        self._answered("get", codes)
        with self._lock:
            s = self._stats
            s.hits += counts["hit"]
            s.misses += n - counts["hit"]
            s.corrupt += counts["corrupt"]
            s.errors += counts["error"]
            s.bytes_read += counts["hit"] * (HEADER_SIZE + size)
        if bad:  # it would fail every later read too (a reader holding it keeps it: no force)
            store.batch_remove(bad, False)
        return result

    def _read(self, key: bytes, code: int, head: np.ndarray, out: memoryview) -> str:
        """What one transfer brought: "hit", "miss", "error" or "corrupt"."""
        if code == NOT_FOUND:
            return "miss"
        if code < 0:
            return "error"
        if code != HEADER_SIZE + len(out):
            return "corrupt"
        try:
            verify(decode_header(head.tobytes()), key, self.layout, out)
        except CorruptChunk:
            return "corrupt"
        return "hit"

    def put(self, keys: Sequence[bytes], payloads: Sequence[Buffer]) -> list[bool]:
        datas = chunk_views(keys, payloads, self.layout.nbytes, "payload")
        if not keys:
            return []
        last = {k: i for i, k in enumerate(keys)}
        if len(last) < len(keys):  # one transfer per name (see get_into): the last payload wins
            uniq = list(last.values())
            ok = dict(zip(uniq, self.put([keys[i] for i in uniq], [datas[i] for i in uniq])))
            return [ok[last[k]] for k in keys]
        store = self._client(len(keys))
        if store is None:
            return [False] * len(keys)
        n, size = len(keys), self.layout.nbytes
        names = [self._name(k) for k in keys]
        with self._header_slots(store, n) as (heads, hptrs), self._pinned(store, datas) as dptrs:
            base = heads.ctypes.data
            for key, data, h in zip(keys, datas, hptrs):
                heads[h - base:h - base + HEADER_SIZE] = np.frombuffer(
                    encode_header(key, self.layout, data, self.label), dtype=np.uint8)
            removed = store.batch_remove(names, True)  # a put would keep an existing value
            if any(c in RPC_CODES for c in removed):
                self._answered("put", removed)
                return [False] * n
            codes = store.batch_put_from_multi_buffers(names, [[h, d] for h, d in zip(hptrs, dptrs)],
                                                       [[HEADER_SIZE, size]] * n)
        self._answered("put", codes)
        ok = [c == 0 for c in codes]
        with self._lock:
            self._stats.puts += sum(ok)
            self._stats.bytes_written += sum(ok) * (HEADER_SIZE + size)
            self._stats.errors += sum(c < 0 and c not in RPC_CODES for c in codes)
        return ok

    def delete(self, keys: Sequence[bytes]) -> None:
        store = self._client(len(keys)) if keys else None
        if store is not None:
            self._answered("delete", store.batch_remove([self._name(k) for k in keys], True))

    def stats(self) -> TierStats:
        with self._lock:
            self._stats.extra["breaker_open"] = int(self._breaker.is_open)
            self._stats.chunks = 0  # the pool is shared: what this process holds is not known here
        return self._stats

    def scan(self) -> Iterator[StoredChunk]:
        """Every chunk under this tier's prefix (for `kvtier inspect`)."""
        store = self._store
        if store is not None:
            yield from scan_store(store, self.admin_url, self.prefix)

    def close(self) -> None:
        self._breaker.close()
        with self._lock:
            self._closed = True
            store, self._store = self._store, None
        if store is not None:
            try:
                store.close()
            except Exception:  # noqa: BLE001 - best effort at shutdown
                pass


def _first_of(keys: Sequence[bytes]) -> dict[bytes, int]:
    """Each distinct key and the index of its first occurrence."""
    first: dict[bytes, int] = {}
    for i, k in enumerate(keys):
        first.setdefault(k, i)
    return first


def scan_store(store, admin_url: str, prefix: str) -> Iterator[StoredChunk]:
    """Chunks under ``prefix`` in the pool of a connected client ``store``: names from the master's
    admin server (``/get_all_keys``), headers read with a ranged get (the first 256 bytes)."""
    names = list_names(admin_url, prefix)
    heads = np.zeros(256 * HEADER_SIZE, dtype=np.uint8)
    base = heads.ctypes.data
    store.register_buffer(base, heads.nbytes)
    try:
        for i in range(0, len(names), 256):
            part = names[i:i + 256]
            got = store.get_into_ranges([base], [part], [[[j * HEADER_SIZE] for j in range(len(part))]],
                                        [[[0]] * len(part)], [[[HEADER_SIZE]] * len(part)])
            for j, ranges in enumerate(got[0] if got else []):
                if not ranges or ranges[0] != HEADER_SIZE:
                    continue  # gone since listed, or shorter than a header
                try:
                    header = decode_header(heads[j * HEADER_SIZE:(j + 1) * HEADER_SIZE].tobytes())
                except CorruptChunk:
                    continue
                yield StoredChunk(header.key, header.nbytes, header.label)
    finally:
        store.unregister_buffer(base)


def scan_pool(master: str, metadata_server: str, admin_url: str, prefix: str = "kvtier:") -> Iterator[StoredChunk]:
    """:func:`scan_store` through a client of its own (adding no memory to the pool)."""
    mc = import_store()
    host, port = master.rpartition(":")[0], int(master.rpartition(":")[2])
    if not MooncakeTier._probe(host, port, 2.0):  # setup would block (GIL held) for seconds
        raise ConnectionError(f"mooncake master {master} does not answer")
    store = mc.MooncakeDistributedStore()
    rc = store.setup(route_address(host, port), metadata_server, 0, 16 << 20, "tcp", "", master)
    if rc != 0:
        raise ConnectionError(f"cannot reach mooncake master {master} / metadata {metadata_server} (rc={rc})")
    try:
        yield from scan_store(store, admin_url, prefix)
    finally:
        store.close()


def list_names(admin_url: str, prefix: str, timeout_s: float = 10.0) -> list[str]:
    """Object names under ``prefix`` that the master at ``admin_url`` lists (``/get_all_keys``)."""
    with urllib.request.urlopen(admin_url.rstrip("/") + "/get_all_keys", timeout=timeout_s) as r:
        text = r.read().decode(errors="replace")
    if text.lstrip().startswith("{"):  # some releases answer JSON
        data = json.loads(text)
        text = "\n".join(map(str, data.get("data", data.get("keys", []))))
    return [n.strip() for n in text.splitlines() if n.strip().startswith(prefix)]
