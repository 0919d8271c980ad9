"""`kvtier serve`: one store in shared memory, used by many engine processes on one host.

The server owns a :class:`kvtier.store.Store` whose cpu tier lives in a POSIX
shared-memory file (:mod:`kvtier.server.shm`). Clients (:class:`kvtier.server.client.RemoteStore`)
map that file and read or write slots themselves; over the socket travel only keys,
slot ids and counts (:mod:`kvtier.server.protocol`). The server never touches an
engine's GPU memory: each engine's own connector copies between the shared slots and
its paged KV, and only for tokens it owns.

One thread serves one ZeroMQ ROUTER socket, so requests are handled in arrival order
(a commit acknowledged to one client is visible to every later lookup). Per client
(session) the server tracks every slot reference it handed out; a session that sends
nothing for ``client_timeout_s`` (clients ping from a background thread) is closed, so
its uncommitted saves never become visible. Its slot references are released only once
its process is gone: a killed engine leaks no slot, and a stalled one (SIGSTOP, swap,
a debugger) that wakes up and finishes a copy into a slot it was given writes into
memory nobody else was handed in the meantime. Until then the slots are quarantined.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import ipaddress
import logging
import os
import secrets
import signal
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from urllib.parse import urlparse

import msgspec
import zmq
from prometheus_client import Counter, Gauge

from kvtier.config import ConfigError, KVTierConfig
from kvtier.layout import ChunkLayout
from kvtier.memory import ChunkRef
from kvtier.metrics import Metrics, serve_http
from kvtier.server import protocol as P
from kvtier.server.shm import SharedPool, SharedRegion, remove_stale
from kvtier.store import Lease, Store
from kvtier.tiers.base import Tier

log = logging.getLogger(__name__)

MAX_SESSIONS = 4096
MAX_LEASES_PER_SESSION = 4096
MAX_LEASED_KEYS_PER_SESSION = 1 << 16


def default_address() -> str:
    return f"ipc:///tmp/kvtier-{os.getuid()}/server.sock"


class ProtocolError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Session:
    id: int
    pid: int
    label: str
    last_seen: float
    held: dict[int, list[ChunkRef]] = field(default_factory=dict)  # slots from Get
    pending: dict[int, ChunkRef] = field(default_factory=dict)  # slots from Allocate, not committed
    leases: dict[int, Lease] = field(default_factory=dict)
    nrefs: int = 0
    leased_keys: int = 0

    def take_refs(self) -> list[ChunkRef]:
        """Remove and return every slot reference (held and pending); leases are released."""
        refs = [r for rs in self.held.values() for r in rs] + list(self.pending.values())
        for lease in self.leases.values():
            lease.release()
        self.held.clear()
        self.pending.clear()
        self.leases.clear()
        self.nrefs = 0
        self.leased_keys = 0
        return refs

    def release_all(self) -> int:
        """Release every slot reference and lease; returns how many references."""
        refs = self.take_refs()
        for r in refs:
            r.release()
        return len(refs)


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (a zombie does not). Unknown counts as alive."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        return stat[stat.rindex(b")") + 2:stat.rindex(b")") + 3] != b"Z"
    except FileNotFoundError:
        return False
    except (OSError, ValueError):
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        pass
    return True


def _check_address(address: str, token: str, allow_remote: bool) -> None:
    u = urlparse(address)
    if u.scheme == "ipc":
        if not u.path:
            raise ValueError(f"{address!r}: expected ipc:///absolute/path")
        return
    if u.scheme != "tcp":
        raise ValueError(f"{address!r}: expected ipc:///path or tcp://127.0.0.1:PORT")
    if not token:
        raise ValueError("a TCP server needs a shared token: set server_token (KVTIER_SERVER_TOKEN)")
    host = u.hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback and not allow_remote:
        raise ValueError(f"{address!r} is not a loopback address; pass allow_remote to listen beyond this host "
                         "(clients still need the shared memory of this host)")


def _build_store(config: KVTierConfig, layout: ChunkLayout, label: str, pool: SharedPool, metrics: Metrics,
                 tiers: Sequence[Tier] | None) -> Store:
    """A Store whose cpu tier is ``pool`` (shared memory)."""
    return Store(config, layout, label, metrics, pin=False, tiers=tiers, pool=pool)


class Server:
    """Serve one shared store at ``address`` until :meth:`stop` (or SIGTERM/SIGINT via :func:`run`)."""

    def __init__(
        self,
        config: KVTierConfig,
        address: str | None = None,
        layout: ChunkLayout | None = None,
        label: str = "",
        metrics_port: int | None = None,
        client_timeout_s: float = 10.0,
        max_refs_per_client: int = 0,
        allow_remote: bool = False,
        tiers: Sequence[Tier] | None = None,
    ) -> None:
        """``layout`` None: learned from the first client's Hello. ``label``: if set, Hellos must match it.

        ``max_refs_per_client`` 0 = half the slots. ``tiers`` overrides the lower tiers (tests).
        """
        if "cpu" not in config.tiers:
            config = dataclasses.replace(config, tiers=("cpu",) + tuple(config.tiers))
        self.config = config
        self.address = address or config.server or default_address()
        _check_address(self.address, config.server_token, allow_remote)
        self.token = config.server_token
        self.layout = layout
        self.label = label
        self.pin_label = bool(label)
        self.metrics_port = metrics_port
        self.client_timeout_s = client_timeout_s
        self._max_refs_opt = max_refs_per_client
        self._tiers = tiers
        self._prefix = hashlib.blake2s(self.address.encode(), digest_size=4).hexdigest()
        self.server_id = f"{self._prefix}-{os.getpid()}-{secrets.token_hex(4)}"
        self.store: Store | None = None
        self.region: SharedRegion | None = None
        self.sessions: dict[int, Session] = {}
        # pid -> slot references of its expired sessions, kept until the process is gone.
        self.quarantine: dict[int, list[ChunkRef]] = {}
        self._stop = threading.Event()
        self._ctx = zmq.Context()
        self._sock: zmq.Socket | None = None
        self._ipc_path: str | None = None
        self.metrics = Metrics()
        self._init_metrics()
        self._handlers = {
            P.Hello: self._hello, P.Lookup: self._lookup, P.Contains: self._contains, P.Get: self._get,
            P.Release: self._release, P.Allocate: self._allocate, P.Commit: self._commit,
            P.Lease: self._lease, P.Unlease: self._unlease, P.Ping: self._ping, P.Stats: self._stats,
            P.Flush: self._flush, P.Bye: self._bye,
        }

    # ------------------------------------------------------------ lifecycle
    def _init_metrics(self) -> None:
        r = self.metrics.registry
        self.m_requests = Counter("kvtier_server_requests", "Requests served", ["op"], registry=r)
        self.m_errors = Counter("kvtier_server_errors", "Requests answered with an error", ["code"], registry=r)
        self.m_expired = Counter("kvtier_server_expired_clients", "Sessions closed by timeout", registry=r)
        self.m_reclaimed = Counter("kvtier_server_reclaimed_refs",
                                   "Slot references released because their client went away", registry=r)
        g = Gauge("kvtier_server_clients", "Open sessions", registry=r)
        g.set_function(lambda: len(self.sessions))
        g = Gauge("kvtier_server_client_refs", "Slot references held by clients", registry=r)
        g.set_function(lambda: sum(s.nrefs for s in list(self.sessions.values())))
        g = Gauge("kvtier_server_quarantined_refs",
                  "Slot references of timed-out clients whose process still runs", registry=r)
        g.set_function(lambda: sum(len(v) for v in list(self.quarantine.values())))
        g = Gauge("kvtier_server_free_slots", "Free shared-memory slots", registry=r)
        g.set_function(lambda: self.store.pool.free_slots if self.store else 0)

    def start(self) -> None:
        """Bind the socket (refusing if another server answers there) and open the store if the layout is known."""
        remove_stale(self._prefix)
        sock = self._ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, P.HARD_MESSAGE_BYTES)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
        try:
            self._bind(sock)
        except RuntimeError:
            sock.close()
            raise
        except (OSError, zmq.ZMQError) as e:
            sock.close()
            raise ConfigError(f"address={self.address!r}: cannot listen there ({e}); use "
                              f"ipc:///path/in/a/writable/dir/server.sock (at most 107 characters) "
                              f"or tcp://127.0.0.1:PORT") from e
        self._sock = sock
        try:
            if self.metrics_port is not None:
                try:
                    serve_http(self.metrics, self.metrics_port)
                except OSError as e:
                    raise RuntimeError(f"--metrics-port {self.metrics_port}: cannot listen on 127.0.0.1:"
                                       f"{self.metrics_port} ({e.strerror}); choose a free port") from e
            if self.layout is not None:
                try:
                    self._open_store(self.layout, self.label)
                except ProtocolError as e:  # the command line's layout and settings do not fit
                    raise ConfigError(f"{e}; raise --cpu-bytes or use a smaller layout") from e
        except BaseException:  # a failed start releases what it acquired: socket, shared memory
            self.close(0)
            raise
        log.info("kvtier server %s listening at %s", self.server_id, self.address)

    def _bind(self, sock) -> None:
        u = urlparse(self.address)
        if u.scheme == "ipc":
            path = u.path
            os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
            if os.path.exists(path):
                if _answers(self._ctx, self.address, self.token, timeout_s=0.5):
                    raise RuntimeError(f"another kvtier server is serving at {self.address}")
                os.unlink(path)
            old = os.umask(0o177)
            try:
                sock.bind(self.address)
            finally:
                os.umask(old)
            os.chmod(path, 0o600)
            self._ipc_path = path
        else:
            sock.bind(self.address)

    def _open_store(self, layout: ChunkLayout, label: str) -> None:
        num_slots = self.config.cpu_bytes // layout.nbytes
        if num_slots < 1:
            raise ProtocolError("layout", f"cpu_bytes={self.config.cpu_bytes} holds no chunk of {layout.nbytes} bytes")
        region = SharedRegion.create(layout.nbytes, num_slots, self.server_id)
        try:
            pool = SharedPool(region)
            self.store = _build_store(self.config, layout, label, pool, self.metrics, self._tiers)
        except BaseException:
            region.unlink()
            raise
        self.region = region
        self.layout = layout
        self.label = label
        self.max_refs = self._max_refs_opt or max(1, num_slots // 2)
        log.info("kvtier server: %d slots of %s (%.2f GiB) in %s", num_slots, layout.describe(),
                 region.size / 2**30, region.path)

    def stop(self) -> None:
        self._stop.set()

    def serve_forever(self) -> None:
        if self._sock is None:
            self.start()
        sock = self._sock
        poll_ms = int(max(0.01, min(0.2, self.client_timeout_s / 4)) * 1000)
        next_sweep = time.monotonic()
        while not self._stop.is_set():
            if sock.poll(poll_ms):
                # Drain what is queued before sweeping.
                for _ in range(256):
                    try:
                        frames = sock.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    reply = self.handle(frames[-1])
                    if reply is not None:
                        sock.send_multipart(frames[:-1] + [reply])
            now = time.monotonic()
            if now >= next_sweep:
                self._expire(now)
                next_sweep = now + poll_ms / 1000

    def close(self, timeout: float = 60.0) -> None:
        """Finish write-behind (lower tiers consistent), then remove the socket and the shared file."""
        for s in list(self.sessions.values()):
            s.release_all()
        self.sessions.clear()
        for refs in self.quarantine.values():
            self._reclaim(refs)
        self.quarantine.clear()
        if self.store is not None:
            self.store.close(timeout)
        if self._sock is not None:
            self._sock.close(0)
            self._sock = None
        if self._ipc_path:
            try:
                os.unlink(self._ipc_path)
            except FileNotFoundError:
                pass
        if self.region is not None:
            self.region.unlink()
        self._ctx.term()

    # ------------------------------------------------------------ dispatch
    def handle(self, data: bytes) -> bytes | None:
        """One request in, one encoded reply out (None for one-way requests)."""
        rid = 0
        try:
            if len(data) > P.MAX_MESSAGE_BYTES:
                raise ProtocolError("too_large", f"message of {len(data)} bytes > {P.MAX_MESSAGE_BYTES}")
            try:
                req = P.decode_request(data)
            except (msgspec.DecodeError, msgspec.ValidationError) as e:
                raise ProtocolError("bad_message", str(e)[:300]) from None
            rid = req.rid
            self.m_requests.labels(type(req).__name__.lower()).inc()
            rep = self._handlers[type(req)](req)
            if isinstance(req, P.ONE_WAY) or getattr(req, "noreply", False):
                return None
            rep.rid = rid
            return P.encode(rep)
        except ProtocolError as e:
            self.m_errors.labels(e.code).inc()
            return P.encode(P.Error(rid=rid, code=e.code, message=str(e)))
        except Exception as e:  # a bug must not stop the server
            log.exception("kvtier server: internal error")
            self.m_errors.labels("internal").inc()
            return P.encode(P.Error(rid=rid, code="internal", message=f"{type(e).__name__}: {e}"[:300]))

    def _session(self, client: int) -> Session:
        s = self.sessions.get(client)
        if s is None:
            raise ProtocolError("unknown_client", "no such session (expired or never opened): send hello")
        s.last_seen = time.monotonic()
        return s

    def _need_store(self) -> Store:
        if self.store is None:
            raise ProtocolError("layout", "no store yet")
        return self.store

    def _expire(self, now: float) -> None:
        for s in [s for s in self.sessions.values() if now - s.last_seen > self.client_timeout_s]:
            del self.sessions[s.id]
            self.m_expired.inc()
            refs = s.take_refs()
            if process_alive(s.pid):
                self.quarantine.setdefault(s.pid, []).extend(refs)
                log.warning("kvtier server: client pid %d silent for %.1fs; session closed, its %d slot "
                            "references kept until the process exits", s.pid, now - s.last_seen, len(refs))
            else:
                self._reclaim(refs)
                log.warning("kvtier server: client pid %d gone; released %d slot references", s.pid, len(refs))
        for pid in [p for p in self.quarantine if not process_alive(p)]:
            self._reclaim(self.quarantine.pop(pid))

    def _reclaim(self, refs: list[ChunkRef]) -> None:
        for r in refs:
            r.release()
        self.m_reclaimed.inc(len(refs))

    def _close_session(self, s: Session) -> None:
        s.release_all()
        self.sessions.pop(s.id, None)

    # ------------------------------------------------------------ handlers
    def _hello(self, req: P.Hello) -> P.Welcome:
        if req.version != P.PROTOCOL_VERSION:
            raise ProtocolError("version", f"protocol version {req.version}; this server speaks {P.PROTOCOL_VERSION}")
        if self.token and not hmac.compare_digest(req.token.encode(), self.token.encode()):
            raise ProtocolError("auth", "bad token")
        if self.pin_label and req.label != self.label:
            raise ProtocolError("label", f"this server serves {self.label!r}, not {req.label!r}")
        if req.layout is not None:
            try:
                layout = P.layout_from_msg(req.layout)
            except ValueError as e:
                raise ProtocolError("layout", str(e)) from None
            if self.store is None:
                self._open_store(layout, self.label or req.label)
            elif layout != self.layout:
                raise ProtocolError("layout", f"server holds chunks of {self.layout.describe()}, "
                                    f"client has {layout.describe()}")
        store = self._need_store()
        if len(self.sessions) >= MAX_SESSIONS:
            self._expire(time.monotonic())
            if len(self.sessions) >= MAX_SESSIONS:
                raise ProtocolError("busy", f"{MAX_SESSIONS} sessions open")
        sid = secrets.randbits(63) | 1
        self.sessions[sid] = Session(sid, req.pid, req.label, time.monotonic())
        r = self.region
        return P.Welcome(
            client=sid, server_id=self.server_id, shm_path=r.path, shm_bytes=r.size, data_offset=r.data_offset,
            gen_offset=r.gen_offset, slot_bytes=r.slot_bytes, num_slots=r.num_slots,
            layout=P.layout_to_msg(store.layout), label=self.label, heartbeat_s=self.client_timeout_s / 4,
            max_refs=self.max_refs,
        )

    def _lookup(self, req: P.Lookup) -> P.Count:
        self._session(req.client)
        return P.Count(n=self._need_store().lookup(req.keys))

    def _contains(self, req: P.Contains) -> P.Bools:
        self._session(req.client)
        return P.Bools(values=self._need_store().contains(req.keys))

    def _get(self, req: P.Get) -> P.Slots:
        s = self._session(req.client)
        store = self._need_store()
        room = max(0, self.max_refs - s.nrefs)
        keys = req.keys[:room]
        refs = store.get(keys) if keys else []
        slots, gens = [], []
        gen = self.region.gens
        for ref in refs:
            if ref is None:
                slots.append(-1)
                gens.append(0)
                continue
            s.held.setdefault(ref.slot, []).append(ref)
            s.nrefs += 1
            slots.append(ref.slot)
            gens.append(int(gen[ref.slot]))
        pad = len(req.keys) - len(refs)
        return P.Slots(slots=slots + [-1] * pad, gens=gens + [0] * pad)

    def _release(self, req: P.Release) -> P.Ok:
        s = self._session(req.client)
        bad = 0
        for slot in req.slots:
            ref = s.pending.pop(slot, None)
            if ref is None:
                refs = s.held.get(slot)
                if not refs:
                    bad += 1
                    continue
                ref = refs.pop()
                if not refs:
                    del s.held[slot]
            ref.release()
            s.nrefs -= 1
        if bad:
            self.m_errors.labels("bad_slot").inc(bad)
        return P.Ok()

    def _allocate(self, req: P.Allocate) -> P.Slots:
        s = self._session(req.client)
        store = self._need_store()
        slots, gens = [], []
        for _ in range(min(req.n, max(0, self.max_refs - s.nrefs))):
            ref = store.allocate()
            if ref is None:
                break
            s.pending[ref.slot] = ref
            s.nrefs += 1
            slots.append(ref.slot)
            gens.append(int(self.region.gens[ref.slot]))
        return P.Slots(slots=slots, gens=gens)

    def _commit(self, req: P.Commit) -> P.Count:
        s = self._session(req.client)
        store = self._need_store()
        if len(req.keys) != len(req.slots):
            raise ProtocolError("bad_message", f"{len(req.keys)} keys but {len(req.slots)} slots")
        done = 0
        for key, slot in zip(req.keys, req.slots):
            ref = s.pending.pop(slot, None)
            if ref is None:
                self.m_errors.labels("bad_slot").inc()
                continue
            s.nrefs -= 1
            store.commit(key, ref)
            done += 1
        return P.Count(n=done)

    def _lease(self, req: P.Lease) -> P.Ids:
        s = self._session(req.client)
        if len(s.leases) >= MAX_LEASES_PER_SESSION or s.leased_keys + len(req.keys) > MAX_LEASED_KEYS_PER_SESSION:
            raise ProtocolError("busy", "too many leases open in this session")
        lease = self._need_store().lease(req.keys)
        lid = secrets.randbits(62)
        s.leases[lid] = lease
        s.leased_keys += len(lease.keys)
        return P.Ids(ids=[lid])

    def _unlease(self, req: P.Unlease) -> P.Ok:
        s = self._session(req.client)
        for lid in req.ids:
            lease = s.leases.pop(lid, None)
            if lease is not None:
                s.leased_keys -= len(lease.keys)
                lease.release()
        return P.Ok()

    def _ping(self, req: P.Ping) -> P.Ok:
        if req.client:
            self._session(req.client)
        return P.Ok()

    def _stats(self, req: P.Stats) -> P.StatsReply:
        self._session(req.client)
        return P.StatsReply(values=self.stats())

    def stats(self) -> dict[str, float]:
        v: dict[str, float] = {"clients": len(self.sessions),
                               "client_refs": sum(s.nrefs for s in self.sessions.values()),
                               "quarantined_refs": sum(len(v) for v in self.quarantine.values())}
        store = self.store
        if store is not None:
            v.update(num_slots=store.pool.num_slots, free_slots=store.pool.free_slots,
                     slot_bytes=store.pool.slot_bytes, write_queue=store.pending_writes(),
                     dropped_writes=store.metrics.value("kvtier_dropped_writes_total"))
            for t in store.tiers:
                st = t.stats()
                v[f"{st.name}_chunks"] = st.chunks
                v[f"{st.name}_bytes"] = st.bytes
        return v

    def _flush(self, req: P.Flush) -> P.Count:
        self._session(req.client)
        return P.Count(n=int(self._need_store().flush(req.timeout_s)))

    def _bye(self, req: P.Bye) -> P.Ok:
        self._close_session(self._session(req.client))
        return P.Ok()


def _answers(ctx: zmq.Context, address: str, token: str = "", timeout_s: float = 1.0) -> bool:
    """Whether a kvtier server answers a Ping at ``address``."""
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(address)
        sock.send(P.encode(P.Ping(rid=1)))
        if not sock.poll(int(timeout_s * 1000)):
            return False
        rep = P.decode_reply(sock.recv())
        return isinstance(rep, P.Ok)
    except (zmq.ZMQError, msgspec.DecodeError, msgspec.ValidationError):
        return False
    finally:
        sock.close(0)


def ping(address: str, timeout_s: float = 1.0) -> bool:
    """`kvtier health`: True when a server answers at ``address``."""
    ctx = zmq.Context()
    try:
        return _answers(ctx, address, timeout_s=timeout_s)
    finally:
        ctx.term()


def run(server: Server) -> None:
    """Serve until SIGTERM or SIGINT, then shut down cleanly (write-behind flushed)."""
    def on_signal(signum: int, frame: object) -> None:
        log.info("kvtier server: signal %d, shutting down", signum)
        server.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server.start()
    try:
        server.serve_forever()
    finally:
        server.close()
