"""The redis tier: chunks in Redis / Valkey, in string values of at most 4 MiB.

Key: ``prefix + hex(chunk key)``; value: the 256-byte header of :mod:`kvtier.layout`
followed by the payload, so a reader checks layout, key and checksum of what it got.
Namespaces (model, dtype, TP rank...) are folded into the chunk keys themselves.

A chunk larger than ``piece_bytes`` (4 MiB) is stored as several values: the first holds the
header and the first 4 MiB, ``NAME:{NAME}:1``, ``:2``... the rest (the ``{NAME}`` hash tag puts
them in the first value's cluster slot). On 2 cores puts of 32 MiB chunks ran 2-3x faster in
4 MiB values than in one (docs/config.md, "Large chunks in Redis"). A reader needs
every piece and the checksum over all of them: a piece evicted or expired on its own is a miss,
and the chunk's other pieces are removed. A writer sets the first piece last, so a reader that
sees it sees the others.

Every call is one pipelined round trip per server (EXISTS / GET / SET / UNLINK per value,
no transaction; a read, one per :data:`READ_TRIP_BYTES` of chunks), with connect and socket
timeouts. Reads parse the replies themselves and receive each value straight into its chunk's
destination (:mod:`kvtier.tiers.resp`), then check the chunk's checksum there. The socket timeout is ``op_timeout_s``,
or for a pipeline moving more bytes than that covers at ``slow_bytes_per_s`` (50 MB/s), their
time at that rate, rounded up to ``op_timeout_s * 2**k``: a big batch is not cut off by a
timeout sized for small ones, and a hung server still costs a small call one ``op_timeout_s``.

Cluster mode (``cluster=True`` or several URLs): the tier reads the slot map with
``CLUSTER SLOTS`` from any reachable node, hashes each key to its slot
(:func:`redis.crc.key_slot`) and sends one pipeline to each node owning keys of the
batch. It talks to each node with its own client and its own circuit breaker, so a
dead node costs only its own keys (they miss) while the others keep answering. (A
``RedisCluster`` pipeline fails or stalls the whole batch when one node is down,
which is why the routing is done here.) A MOVED/ASK answer or a node failure marks the
slot map stale; it is read again on the next call (at most once per ``retry_after_s``).

Circuit breaker: a connection error or timeout on a server opens its breaker; the tier then
answers misses / False for that server without touching the network, while a thread of the
breaker's PINGs it every ``retry_after_s`` (never a caller: a lookup on the engine's thread
must not wait out the connect timeout of a host that is gone); an answer closes the breaker.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Iterator, Sequence

import redis
from redis.backoff import NoBackoff
from redis.connection import parse_url
from redis.crc import key_slot
from redis.retry import Retry

from kvtier.layout import HEADER_SIZE, ChunkLayout, CorruptChunk, decode_header, encode_header, verify
from kvtier.tiers.base import SLOW_BYTES_PER_S, Buffer, StoredChunk, Tier, TierStats, chunk_views, time_for_bytes
from kvtier.tiers.breaker import Breaker as _Breaker
from kvtier.tiers.resp import ReplyError, ReplyReader, encode_command, send_parts

log = logging.getLogger(__name__)

SLOTS = 16384
PIECE_BYTES = 4 << 20  # largest value of a chunk's payload (docs/config.md: measured)
# Most bytes one read round trip asks a server for (at least one chunk). The server holds the
# replies of a whole pipeline at once: with a load's 4 chunks of 32 MiB in one, 4 clients on 2 cores
# read 0.29 GB/s in all; one chunk per trip, 1.1-1.5 GB/s (docs/tiers.md).
READ_TRIP_BYTES = 32 << 20
_SLOTS_MOVED = ("MOVED", "ASK", "TRYAGAIN", "CLUSTERDOWN")  # error replies of a cluster whose slot map changed


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


def _connection(pool: redis.ConnectionPool) -> redis.connection.AbstractConnection:
    """A connection of ``pool`` for the caller alone (release it to the pool when done)."""
    try:
        return pool.get_connection()
    except TypeError:  # redis-py < 5.3 asks for a command name
        return pool.get_connection("GET")


class _Node:
    """One server: a client (connection pool) per socket timeout in use, and one breaker."""

    def __init__(self, name: str, kwargs: dict, timeout_s: float, retry_after_s: float) -> None:
        self.name = name
        self._kwargs = kwargs
        self._clients: dict[float, redis.Redis] = {}
        self._lock = threading.Lock()
        self.client = self.client_for(timeout_s)
        self.breaker = _Breaker(retry_after_s, probe=self._answers)

    def _answers(self) -> bool:
        """The breaker's probe, run by its own thread: the server answers a PING."""
        if self.client.ping():
            log.info("redis tier: %s answers again", self.name)
            return True
        return False

    def client_for(self, timeout_s: float) -> redis.Redis:
        client = self._clients.get(timeout_s)
        if client is None:
            with self._lock:
                client = self._clients.get(timeout_s)
                if client is None:
                    client = self._clients[timeout_s] = redis.Redis(**self._kwargs, socket_timeout=timeout_s)
        return client

    def disconnect(self) -> None:
        for client in list(self._clients.values()):
            client.connection_pool.disconnect()

    def close(self) -> None:
        self.breaker.close()
        for client in list(self._clients.values()):
            client.close()


class RedisTier(Tier):
    name = "redis"

    def __init__(self, urls: Sequence[str], layout: ChunkLayout, label: str = "", cluster: bool = False,
                 prefix: str = "kvtier:", ttl_s: int = 0, connect_timeout_s: float = 1.0,
                 op_timeout_s: float = 2.0, retry_after_s: float = 2.0, piece_bytes: int = PIECE_BYTES,
                 slow_bytes_per_s: float = SLOW_BYTES_PER_S) -> None:
        """``piece_bytes``: largest value of a chunk (a format setting: readers must use the writer's)."""
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
        self.op_timeout_s = op_timeout_s
        self.slow_bytes_per_s = slow_bytes_per_s
        self._quick_s = min(0.25, op_timeout_s / 4)  # a failure sooner than this came at once: retried
        if piece_bytes <= 0:
            raise ValueError(f"piece_bytes must be > 0, got {piece_bytes}")
        self.piece_bytes = piece_bytes
        self._pieces = -(-layout.nbytes // piece_bytes)
        self._conn_kwargs = dict(
            socket_connect_timeout=connect_timeout_s,
            # One immediate retry on a broken connection (a server restarted since the last
            # call); none after a wait, so a hung server costs one op_timeout, then the breaker.
            retry=_QuickRetry(self._quick_s),
            health_check_interval=0,
        )
        self._lock = threading.Lock()
        self._nodes: dict[str, _Node] = {}
        self._stats = TierStats("redis")
        self._stats.extra.update(skipped=0, breaker_open=0, partial=0)
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
        node = _Node(name, {**kw, **self._conn_kwargs}, self.op_timeout_s, self.retry_after_s)
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
                    node = _Node(name, {**kw, **self._conn_kwargs}, self.op_timeout_s, self.retry_after_s)
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

    def _timeout(self, nbytes: int) -> float:
        """Socket timeout of a pipeline moving ``nbytes``: ``op_timeout_s``, or their time at
        ``slow_bytes_per_s`` rounded up to ``op_timeout_s * 2**k`` (few pools of connections)."""
        need = time_for_bytes(nbytes, self.op_timeout_s, self.slow_bytes_per_s)
        return self.op_timeout_s * 2 ** math.ceil(math.log2(need / self.op_timeout_s))

    def _node_failed(self, node: _Node, error: BaseException) -> None:
        if not node.breaker.is_open:
            log.warning("redis tier: %s failed (%s: %s); answering misses for it, retrying every %.1fs",
                        node.name, type(error).__name__, error, self.retry_after_s)
        node.breaker.failure()
        with self._lock:
            self._stats.errors += 1
        try:
            node.disconnect()
        except Exception:  # noqa: BLE001 - best effort cleanup of broken sockets
            pass
        if self.cluster:
            self._slots = None  # a replica may have taken over its slots

    def _per_key(self, names: Sequence[bytes], frame, read, default, nbytes: int = 0) -> list:
        """Per key of ``names``, ``read(reader, i)`` of the replies to the commands ``frame(i)``
        frames (:func:`encode_command`), sent in one pipelined round trip per server; ``default``
        for the keys of a server that failed or of a slot no node serves. ``read`` must read
        every reply of its key. ``nbytes``: bytes each key moves (they lengthen the timeout)."""
        out = [default] * len(names)
        for node, idx in self._route(names).items():
            parts = [p for i in idx for p in frame(i)]
            got = self._exchange(node, parts, len(idx) * nbytes, lambda reader: [read(reader, i) for i in idx])
            if got is None:
                with self._lock:
                    self._stats.extra["skipped"] += len(idx)
                continue
            for i, value in zip(idx, got):
                out[i] = value
        return out

    def _check_moved(self, reply) -> None:
        if isinstance(reply, str) and reply.split(" ", 1)[0] in _SLOTS_MOVED:
            self._slots = None  # slots moved: read the map again on the next call

    def _name(self, key: bytes) -> bytes:
        return self.prefix + key.hex().encode()

    def _piece_names(self, name: bytes) -> list[bytes]:
        """The values of one chunk: ``name`` (header + first piece), then ``name:{name}:i``."""
        return [name] + [b"%s:{%s}:%d" % (name, name, i) for i in range(1, self._pieces)]

    def _piece(self, data: memoryview, i: int) -> memoryview:
        return data[i * self.piece_bytes:(i + 1) * self.piece_bytes]

    # ---- Tier -----------------------------------------------------------------------------
    def contains(self, keys: Sequence[bytes]) -> list[bool]:
        """One ``EXISTS`` of all of a chunk's values per chunk (they share a cluster slot: the
        ``{NAME}`` hash tag), which counts the values present."""
        names = [self._name(k) for k in keys]

        def read(reader: ReplyReader, i: int) -> bool:
            n = reader.integer()
            self._check_moved(n)
            return n == self._pieces

        frame = lambda i: encode_command((b"EXISTS", *self._piece_names(names[i])))  # noqa: E731
        return self._per_key(names, frame, read, False)

    def get_into(self, keys: Sequence[bytes], dests: Sequence[Buffer]) -> list[bool]:
        outs = chunk_views(keys, dests, self.layout.nbytes, "destination")
        names = [self._name(k) for k in keys]
        frame = lambda i: [p for n in self._piece_names(names[i]) for p in encode_command((b"GET", n))]  # noqa: E731
        read = lambda reader, i: self._read_chunk(reader, keys[i], outs[i])  # noqa: E731
        statuses: list[str] = []
        per_trip = max(1, READ_TRIP_BYTES // self.layout.nbytes)
        for t in range(0, len(keys), per_trip):  # a failed server's breaker is open: its later trips cost nothing
            trip = range(t, min(t + per_trip, len(keys)))
            statuses += self._per_key([names[i] for i in trip], lambda j: frame(t + j), lambda r, j: read(r, t + j),
                                      "miss", self.layout.nbytes)
        counts = dict.fromkeys(("hit", "miss", "error", "corrupt", "partial"), 0)
        for status in statuses:
            counts[status] += 1
        with self._lock:
            s = self._stats
            s.hits += counts["hit"]
            s.misses += len(keys) - counts["hit"]
            s.corrupt += counts["corrupt"]
            s.errors += counts["error"]
            s.extra["partial"] += counts["partial"]
            s.bytes_read += counts["hit"] * (HEADER_SIZE + self.layout.nbytes)
        bad = [name for name, status in zip(names, statuses) if status in ("corrupt", "partial")]
        if bad:  # a corrupt or incomplete chunk would fail every later read too
            self._delete_names(bad)
        return [status == "hit" for status in statuses]

    def _exchange(self, node: _Node, parts: list, nbytes: int, read):
        """Send the commands framed in ``parts`` on a connection of ``node`` held alone, and return
        ``read(reader)``, which must read every reply. None (and the breaker opened) if the server
        failed. A connection broken before any reply (a server restarted since the last call) is
        retried once; never after a timeout: a hung server costs one op_timeout, then the breaker.
        Nor after a wait: another caller's failure disconnects the node's pools, which closes this
        caller's connection under it, unanswered, after it waited; the breaker is open by then."""
        if not node.breaker.allow():
            return None
        pool = node.client_for(self._timeout(nbytes)).connection_pool
        start = time.monotonic()
        for attempt in (0, 1):
            conn = reader = None
            try:
                conn = _connection(pool)  # connects (redis-py 5.3+): may fail like a command
                if getattr(conn, "_sock", None) is None:
                    conn.connect()  # a pool that hands out connections unconnected
                sock = getattr(conn, "_sock", None)
                if sock is None:
                    raise ReplyError("this redis-py connection has no socket to use")
                send_parts(sock, parts)
                reader = ReplyReader(sock)
                result = read(reader)
            except (redis.exceptions.RedisError, OSError, ReplyError) as e:
                if conn is not None:
                    conn.disconnect()  # in an unknown state: half a reply may be unread
                    pool.release(conn)
                unanswered = reader is None or reader.received == 0
                at_once = time.monotonic() - start < self._quick_s
                timed_out = isinstance(e, (TimeoutError, redis.TimeoutError))
                if attempt == 0 and unanswered and at_once and not timed_out and node.breaker.allow():
                    continue
                self._node_failed(node, e)
                return None
            pool.release(conn)
            node.breaker.success()
            return result
        return None

    def _read_chunk(self, reader: ReplyReader, key: bytes, out: memoryview) -> str:
        """Read the replies to one chunk's GETs, its values into ``out``, and check it all: "hit",
        "miss", "error" (the server's), "corrupt" or "partial" (a piece is gone: evicted or expired
        on its own). Every reply is read whatever the status, so the next chunk's come next."""
        header = bytearray(HEADER_SIZE)
        kinds: list[str] = []
        for i in range(self._pieces):
            n = reader.bulk_header()
            if n is None:
                kinds.append("none")
                continue
            if isinstance(n, str):  # the server's error for this value
                self._check_moved(n)
                kinds.append("error")
                continue
            dest = self._piece(out, i)
            want = len(dest) + (HEADER_SIZE if i == 0 else 0)
            if n != want:
                reader.skip_bulk(n)
                kinds.append("resized")
                continue
            if i == 0:
                reader.read_into(memoryview(header))
            reader.bulk_into(dest)
            kinds.append("value")
        if "error" in kinds:
            return "error"
        if kinds[0] == "none":
            return "miss"  # not stored, or a put that has not set its first value yet
        if "none" in kinds:
            return "partial"
        if "resized" in kinds:
            return "corrupt"
        try:
            verify(decode_header(header), key, self.layout, out)  # one pass over what landed in out
        except CorruptChunk:
            return "corrupt"
        return "hit"

    def put(self, keys: Sequence[bytes], payloads: Sequence[Buffer]) -> list[bool]:
        """SET every piece of each chunk, the first (header + first piece) last: a reader that sees
        it sees the others. The values go from ``payloads`` to the socket without a copy."""
        datas = chunk_views(keys, payloads, self.layout.nbytes, "payload")
        names = [self._name(k) for k in keys]
        ex = (b"EX", b"%d" % self.ttl_s) if self.ttl_s else ()

        def frame(i: int) -> list:
            data, pieces = datas[i], self._piece_names(names[i])
            parts: list = []
            for j in range(len(pieces) - 1, 0, -1):
                parts += encode_command((b"SET", pieces[j], self._piece(data, j)) + ex)
            header = encode_header(keys[i], self.layout, data, self.label)
            return parts + encode_command((b"SET", pieces[0], (header, self._piece(data, 0))) + ex)

        def read(reader: ReplyReader, i: int) -> bool | None:
            errors = [e for e in (reader.status() for _ in range(self._pieces)) if e is not None]
            for e in errors:
                self._check_moved(e)
            return None if errors else True  # None: the server refused (counted), False: not reached

        answers = self._per_key(names, frame, read, False, self.layout.nbytes)
        with self._lock:
            n = answers.count(True)
            self._stats.puts += n
            self._stats.bytes_written += n * (HEADER_SIZE + self.layout.nbytes)
            self._stats.errors += answers.count(None)
        return [a is True for a in answers]

    def delete(self, keys: Sequence[bytes]) -> None:
        self._delete_names([self._name(k) for k in keys])

    def _delete_names(self, names: Sequence[bytes]) -> None:
        """Remove the chunks stored under ``names`` (first values), every piece of each."""
        frame = lambda i: encode_command((b"UNLINK", *self._piece_names(names[i])))  # noqa: E731
        self._per_key(names, frame, lambda reader, i: reader.integer(), None)

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
                    if b":" in name[len(self.prefix):]:
                        continue  # a chunk's second, third... value: the chunk is reported by its first
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
                node.close()
            except Exception:  # noqa: BLE001
                pass


def _glob_escape(s: bytes) -> bytes:
    out = bytearray()
    for c in s:
        if c in b"*?[]\\":
            out += b"\\"
        out.append(c)
    return bytes(out)
