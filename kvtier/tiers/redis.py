"""The redis tier: chunks in Redis / Valkey, one string value per chunk.

Key: ``prefix + hex(chunk key)``; value: the 256-byte header of :mod:`kvtier.layout`
followed by the payload, so a reader checks layout, key and checksum of what it got.
Namespaces (model, dtype, TP rank...) are folded into the chunk keys themselves.

Every call is one pipelined round trip per server (EXISTS / GET / SET / UNLINK per key,
no transaction), with connect and socket timeouts.

Cluster mode (``cluster=True`` or several URLs): the tier reads the slot map with
``CLUSTER SLOTS`` from any reachable node, hashes each key to its slot
(:func:`redis.crc.key_slot`) and sends one pipeline to each node owning keys of the
batch. It talks to each node with its own client and its own circuit breaker, so a
dead node costs only its own keys (they miss) while the others keep answering. (A
``RedisCluster`` pipeline fails or stalls the whole batch when one node is down,
which is why the routing is done here.) A MOVED/ASK answer or a node failure marks the
slot map stale; it is read again on the next call (at most once per ``retry_after_s``).

Circuit breaker: a connection error or timeout on a server opens its breaker; for
``retry_after_s`` the tier then answers misses / False for that server without touching
the network. After that, one caller probes the server; success closes the breaker.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Sequence

import redis
from redis.backoff import NoBackoff
from redis.connection import parse_url
from redis.crc import key_slot
from redis.retry import Retry

from kvtier.layout import HEADER_SIZE, ChunkLayout, CorruptChunk, decode_header, encode_header, verify
from kvtier.tiers.base import Buffer, StoredChunk, Tier, TierStats
from kvtier.tiers.disk import as_bytes

log = logging.getLogger(__name__)

SLOTS = 16384


class _Breaker:
    """Closed (0.0) or open until a monotonic time; after it, one caller probes."""

    def __init__(self, retry_after_s: float) -> None:
        self.retry_after_s = retry_after_s
        self.open_until = 0.0
        self._lock = threading.Lock()

    def allow(self) -> bool:
        if self.open_until == 0.0:
            return True
        with self._lock:
            now = time.monotonic()
            if now < self.open_until:
                return False
            self.open_until = now + self.retry_after_s  # this caller probes; others wait
            return True

    def success(self) -> None:
        self.open_until = 0.0

    def failure(self) -> None:
        self.open_until = time.monotonic() + self.retry_after_s

    @property
    def is_open(self) -> bool:
        return self.open_until != 0.0


class _QuickRetry(Retry):
    """One immediate retry, only of a call that failed at once (a connection a restarted server
    closed), never of one that waited: a slow server costs every caller one ``op_timeout_s``
    at most, however many callers there are. Self-contained (redis-py 5 to 8 differ in the
    arguments they pass)."""

    def __init__(self, quick_s: float) -> None:
        super().__init__(NoBackoff(), 1, supported_errors=(redis.exceptions.ConnectionError,))
        self.quick_s = quick_s

    def call_with_retry(self, do, fail, is_retryable=None, with_failure_count=False):
        start = time.monotonic()
        try:
            return do()
        except redis.exceptions.ConnectionError as error:
            if with_failure_count:
                fail(error, 1)
            else:
                fail(error)
            waited = time.monotonic() - start >= self.quick_s
            if waited or (is_retryable is not None and not is_retryable(error)):
                raise
        return do()


class _Node:
    def __init__(self, name: str, client: redis.Redis, retry_after_s: float) -> None:
        self.name = name
        self.client = client
        self.breaker = _Breaker(retry_after_s)


class RedisTier(Tier):
    name = "redis"

    def __init__(self, urls: Sequence[str], layout: ChunkLayout, label: str = "", cluster: bool = False,
                 prefix: str = "kvtier:", ttl_s: int = 0, connect_timeout_s: float = 1.0,
                 op_timeout_s: float = 2.0, retry_after_s: float = 2.0) -> None:
        urls = [urls] if isinstance(urls, str) else list(urls)
        if not urls:
            raise ValueError("RedisTier needs at least one redis:// URL")
        self.urls = urls
        self.layout = layout
        self.label = label
        self.cluster = cluster or len(urls) > 1
        self.prefix = prefix.encode()
        self.ttl_s = int(ttl_s)
        self.retry_after_s = retry_after_s
        self._conn_kwargs = dict(
            socket_connect_timeout=connect_timeout_s, socket_timeout=op_timeout_s,
            # One immediate retry on a broken connection (a server restarted since the last
            # call); none after a wait, so a hung server costs one op_timeout, then the breaker.
            retry=_QuickRetry(min(0.25, op_timeout_s / 4)),
            health_check_interval=0,
        )
        self._lock = threading.Lock()
        self._nodes: dict[str, _Node] = {}
        self._stats = TierStats("redis")
        self._stats.extra.update(skipped=0, breaker_open=0)
        if self.cluster:
            self._seeds = [self._node_for_url(u) for u in urls]
            self._slots: list[_Node] | None = None
            self._topology_breaker = _Breaker(retry_after_s)
        else:
            self._single = self._node_for_url(urls[0])

    # ---- connections ----------------------------------------------------------------------
    def _node_for_url(self, url: str) -> _Node:
        kw = parse_url(url)
        if "path" in kw:  # unix:///path/redis.sock: redis.Redis names it unix_socket_path
            kw["unix_socket_path"] = kw.pop("path")
            kw.pop("connection_class", None)
            name = f"unix:{kw['unix_socket_path']}"
        else:
            name = f"{kw.get('host', '127.0.0.1')}:{kw.get('port', 6379)}"
        client = redis.Redis(**kw, **self._conn_kwargs)
        node = _Node(name, client, self.retry_after_s)
        self._nodes[name] = node
        return node

    def _node_at(self, host: str, port: int) -> _Node:
        name = f"{host}:{port}"
        node = self._nodes.get(name)
        if node is None:
            with self._lock:
                node = self._nodes.get(name)
                if node is None:
                    kw = parse_url(self.urls[0])
                    kw.pop("db", None)
                    kw.update(host=host, port=port)
                    node = _Node(name, redis.Redis(**kw, **self._conn_kwargs), self.retry_after_s)
                    self._nodes[name] = node
        return node

    def _slot_map(self) -> list[_Node] | None:
        """The node of every slot (cluster mode), read again when marked stale."""
        if self._slots is not None or not self._topology_breaker.allow():
            return self._slots
        candidates = list(self._seeds) + [n for n in list(self._nodes.values()) if n not in self._seeds]
        for node in candidates:
            if node.breaker.is_open:
                continue
            try:
                entries = node.client.execute_command("CLUSTER SLOTS")
            except (redis.exceptions.RedisError, OSError):
                continue
            slots: list[_Node | None] = [None] * SLOTS
            seed_host = node.client.connection_pool.connection_kwargs.get("host", "127.0.0.1")
            for entry in entries:
                start, end, primary = int(entry[0]), int(entry[1]), entry[2]
                host = primary[0].decode() if isinstance(primary[0], bytes) else str(primary[0])
                target = self._node_at(host or seed_host, int(primary[1]))
                for s in range(start, end + 1):
                    slots[s] = target
            self._slots = slots  # slots no node serves stay None: their keys miss
            self._topology_breaker.success()
            return self._slots
        with self._lock:
            self._stats.errors += 1
        return self._slots

    def _route(self, names: Sequence[bytes]) -> dict[_Node, list[int]]:
        """Indices of ``names`` grouped by the node that holds them (empty if unknown)."""
        if not self.cluster:
            return {self._single: list(range(len(names)))}
        slots = self._slot_map()
        groups: dict[_Node, list[int]] = {}
        if slots is None:
            return groups
        for i, name in enumerate(names):
            node = slots[key_slot(name)]
            if node is not None:
                groups.setdefault(node, []).append(i)
        return groups

    def _pipeline(self, node: _Node, build) -> list | None:
        """Run one pipeline on ``node``; None (and the breaker opened) if the server failed."""
        if not node.breaker.allow():
            return None
        try:
            pipe = node.client.pipeline(transaction=False)
            build(pipe)
            replies = pipe.execute(raise_on_error=False)
        except (redis.exceptions.RedisError, OSError) as e:
            self._node_failed(node, e)
            return None
        if node.breaker.is_open:
            log.info("redis tier: %s answers again", node.name)
        node.breaker.success()
        if self.cluster and any(isinstance(r, (redis.exceptions.AskError, redis.exceptions.ClusterDownError,
                                               redis.exceptions.TryAgainError)) for r in replies):
            self._slots = None  # slots moved: read the map again on the next call
        return replies

    def _node_failed(self, node: _Node, error: BaseException) -> None:
        if not node.breaker.is_open:
            log.warning("redis tier: %s failed (%s: %s); answering misses for it, retrying every %.1fs",
                        node.name, type(error).__name__, error, self.retry_after_s)
        node.breaker.failure()
        with self._lock:
            self._stats.errors += 1
        try:
            node.client.connection_pool.disconnect()
        except Exception:  # noqa: BLE001 - best effort cleanup of broken sockets
            pass
        if self.cluster:
            self._slots = None  # a replica may have taken over its slots

    def _run(self, names: Sequence[bytes], build_one, default) -> list:
        """Per key, the reply of the command ``build_one(pipe, i)`` adds, or ``default``."""
        out = [default] * len(names)
        for node, idx in self._route(names).items():
            replies = self._pipeline(node, lambda pipe: [build_one(pipe, i) for i in idx])
            if replies is None:
                with self._lock:
                    self._stats.extra["skipped"] += len(idx)
                continue
            for i, r in zip(idx, replies):
                out[i] = r
        return out  # keys of slots no node serves keep ``default``

    def _name(self, key: bytes) -> bytes:
        return self.prefix + key.hex().encode()

    # ---- Tier -----------------------------------------------------------------------------
    def contains(self, keys: Sequence[bytes]) -> list[bool]:
        names = [self._name(k) for k in keys]
        replies = self._run(names, lambda pipe, i: pipe.exists(names[i]), None)
        return [isinstance(r, int) and r > 0 for r in replies]

    def get_into(self, keys: Sequence[bytes], dests: Sequence[Buffer]) -> list[bool]:
        outs = [as_bytes(d) for d in dests]
        if len(outs) != len(keys):
            raise ValueError(f"{len(keys)} keys but {len(outs)} destinations")
        for o in outs:
            if len(o) != self.layout.nbytes:
                raise ValueError(f"destination of {len(o)} bytes, the layout needs {self.layout.nbytes}")
        names = [self._name(k) for k in keys]
        replies = self._run(names, lambda pipe, i: pipe.get(names[i]), None)
        result = []
        bad = []
        hits = misses = corrupt = errors = nread = 0
        for key, name, out, value in zip(keys, names, outs, replies):
            if not isinstance(value, bytes):
                misses += 1
                errors += isinstance(value, Exception)
                result.append(False)
                continue
            try:
                if len(value) < HEADER_SIZE:
                    raise CorruptChunk(f"value of {len(value)} bytes is shorter than a header")
                mv = memoryview(value)
                header = decode_header(mv[:HEADER_SIZE])
                verify(header, key, self.layout, mv[HEADER_SIZE:])
            except CorruptChunk:
                misses += 1
                corrupt += 1
                bad.append(name)
                result.append(False)
                continue
            out[:] = mv[HEADER_SIZE:]
            hits += 1
            nread += len(value)
            result.append(True)
        with self._lock:
            s = self._stats
            s.hits += hits
            s.misses += misses
            s.corrupt += corrupt
            s.errors += errors
            s.bytes_read += nread
        if bad:  # a corrupt value would fail every later read too
            self._run(bad, lambda pipe, i: pipe.unlink(bad[i]), None)
        return result

    def put(self, keys: Sequence[bytes], payloads: Sequence[Buffer]) -> list[bool]:
        datas = [as_bytes(p) for p in payloads]
        if len(datas) != len(keys):
            raise ValueError(f"{len(keys)} keys but {len(datas)} payloads")
        for d in datas:
            if len(d) != self.layout.nbytes:
                raise ValueError(f"payload of {len(d)} bytes, the layout needs {self.layout.nbytes}")
        names = [self._name(k) for k in keys]
        ex = self.ttl_s or None

        def build(pipe, i):
            # One copy (header + payload in one value), the same count as bytes(payload).
            value = b"".join((encode_header(keys[i], self.layout, datas[i], self.label), datas[i]))
            pipe.set(names[i], value, ex=ex)

        replies = self._run(names, build, None)
        ok = [r is True for r in replies]
        with self._lock:
            n = sum(ok)
            self._stats.puts += n
            self._stats.bytes_written += n * (HEADER_SIZE + self.layout.nbytes)
            self._stats.errors += sum(isinstance(r, Exception) for r in replies)
        return ok

    def delete(self, keys: Sequence[bytes]) -> None:
        names = [self._name(k) for k in keys]
        self._run(names, lambda pipe, i: pipe.unlink(names[i]), None)

    def stats(self) -> TierStats:
        with self._lock:
            self._stats.extra["breaker_open"] = sum(n.breaker.is_open for n in self._nodes.values())
        return self._stats

    def scan(self) -> Iterator[StoredChunk]:
        pattern = _glob_escape(self.prefix) + b"*"
        if self.cluster:
            slots = self._slot_map() or []
            nodes = list({n.name: n for n in slots if n is not None}.values())
        else:
            nodes = [self._single]
        for node in nodes:
            if node.breaker.is_open:
                continue
            try:
                batch: list[bytes] = []
                for name in node.client.scan_iter(match=pattern, count=1000):
                    batch.append(name)
                    if len(batch) >= 256:
                        yield from self._describe(node, batch)
                        batch = []
                yield from self._describe(node, batch)
            except (redis.exceptions.RedisError, OSError) as e:
                self._node_failed(node, e)

    def _describe(self, node: _Node, names: list[bytes]) -> Iterator[StoredChunk]:
        if not names:
            return
        pipe = node.client.pipeline(transaction=False)
        for n in names:
            pipe.getrange(n, 0, HEADER_SIZE - 1)
        for name, head in zip(names, pipe.execute(raise_on_error=False)):
            try:
                key = bytes.fromhex(name[len(self.prefix):].decode())
                header = decode_header(head)
            except (ValueError, TypeError, CorruptChunk):
                continue
            yield StoredChunk(key, header.nbytes, header.label)

    def close(self) -> None:
        for node in list(self._nodes.values()):
            try:
                node.client.close()
            except Exception:  # noqa: BLE001
                pass


def _glob_escape(s: bytes) -> bytes:
    out = bytearray()
    for c in s:
        if c in b"*?[]\\":
            out += b"\\"
        out.append(c)
    return bytes(out)
