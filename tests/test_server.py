"""`kvtier serve` with real processes: sharing, hostile input, dead clients, dead server, SIGTERM."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time

import msgspec
import numpy as np
import pytest
import torch
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvtier.config import KVTierConfig
from kvtier.layout import ChunkLayout
from kvtier.server import protocol as P
from kvtier.server.client import RemoteStore
from kvtier.server.shm import SharedRegion

LAYOUT = ChunkLayout(2, 16, 8, torch.float16)  # 1 KiB chunks
TIMEOUT = 1.0  # server's client timeout in these tests


def key(i: int) -> bytes:
    return i.to_bytes(16, "little")


def payload(i: int) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(i).integers(0, 256, LAYOUT.nbytes, dtype=np.uint8))


def client_config(addr: str, **kw) -> KVTierConfig:
    return KVTierConfig(server=addr, op_timeout_s=0.5, connect_timeout_s=0.5, retry_after_s=0.1, **kw)


def wait_for(cond, timeout=10.0, step=0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(step)
    return cond()


@contextlib.contextmanager
def server(addr: str | None = None, *args: str, cpu_chunks: int = 64, env: dict | None = None, check_rc=True):
    """A `kvtier serve` subprocess; yields (address, Popen)."""
    tmp = tempfile.mkdtemp(prefix="kvs-", dir="/tmp")  # short: ipc paths are limited to ~100 bytes
    addr = addr or f"ipc://{tmp}/s.sock"
    proc = start_server(addr, *args, cpu_chunks=cpu_chunks, env=env)
    try:
        yield addr, proc
    finally:
        if proc.poll() is None:
            proc.terminate()
        rc = proc.wait(30)
        shutil.rmtree(tmp, ignore_errors=True)
        if check_rc:
            assert rc in (0, -signal.SIGKILL), proc.stderr.read().decode()[-2000:]


def start_server(addr: str, *args: str, cpu_chunks: int = 64, env: dict | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "kvtier.cli", "serve", "--address", addr, "--tiers", "cpu",
           "--cpu-bytes", str(cpu_chunks * LAYOUT.nbytes), "--client-timeout", str(TIMEOUT),
           "--log-level", "WARNING", *args]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, env={**os.environ, **(env or {})})
    ok = wait_for(lambda: proc.poll() is not None or _pings(addr, env), 30)
    assert ok and proc.poll() is None, f"server did not start: {proc.stderr.read().decode()[-2000:]}"
    return proc


def _pings(addr: str, env: dict | None) -> bool:
    from kvtier.server.server import ping

    return ping(addr, 0.2)


class Raw:
    """A bare DEALER socket speaking the protocol by hand (for hostile messages)."""

    def __init__(self, addr: str) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(addr)

    def send_raw(self, data: bytes, timeout=2.0):
        self.sock.send(data)
        if not self.sock.poll(int(timeout * 1000)):
            return None
        return P.decode_reply(self.sock.recv())

    def call(self, msg, timeout=2.0):
        return self.send_raw(P.encode(msg), timeout)

    def hello(self, layout=LAYOUT) -> P.Welcome:

        rep = self.call(P.Hello(label="raw", layout=P.layout_to_msg(layout)))
        assert isinstance(rep, P.Welcome), rep
        return rep

    def close(self):
        self.sock.close(0)
        self.ctx.term()


# ------------------------------------------------------------------ several client processes
def _share_worker(addr: str, me: int, n: int, per: int, barrier, out) -> None:
    store = RemoteStore(client_config(addr), LAYOUT, "m")
    try:
        assert store.connected
        for j in range(per):
            assert store.put(key(me * 100 + j), payload(me * 100 + j))
        barrier.wait(30)
        keys = [key(c * 100 + j) for c in range(n) for j in range(per)]
        assert store.lookup(keys) == len(keys)
        refs = store.get(keys)
        same = all(r is not None and torch.equal(r.data, payload(c * 100 + j)) and r.valid()
                   for r, (c, j) in zip(refs, [(c, j) for c in range(n) for j in range(per)]))
        for r in refs:
            if r is not None:
                r.release()
        out.put((me, same))
    except BaseException as e:  # report instead of hanging the barrier
        out.put((me, repr(e)))
        barrier.abort()
    finally:
        store.close()


def test_client_processes_read_each_others_chunks_and_files_are_private():
    with server() as (addr, _):
        sock_path = addr[len("ipc://"):]
        assert stat.S_IMODE(os.stat(sock_path).st_mode) == 0o600
        ctx = mp.get_context("spawn")
        n, per = 3, 4
        barrier, out = ctx.Barrier(n), ctx.Queue()
        procs = [ctx.Process(target=_share_worker, args=(addr, i, n, per, barrier, out)) for i in range(n)]
        for p in procs:
            p.start()
        results = dict(out.get(timeout=60) for _ in procs)
        for p in procs:
            p.join(10)
        assert results == {i: True for i in range(n)}
        with RemoteStore(client_config(addr), LAYOUT, "m") as s:
            shm = s._region.path
            assert stat.S_IMODE(os.stat(shm).st_mode) == 0o600
            assert wait_for(lambda: s.stats().get("client_refs", -1) == 0, 5)
            assert s.stats()["clients"] == 1  # the workers said bye


# ------------------------------------------------------------------ hostile input
@pytest.fixture(scope="module")
def shared_server():
    with server(cpu_chunks=32) as (addr, proc):
        raw = Raw(addr)
        raw.hello()  # fixes the store's layout before any fuzzing (a layout is learned from the first hello)
        raw.close()
        yield addr, proc


def _assert_alive(raw: Raw) -> None:
    assert isinstance(raw.call(P.Ping(rid=7)), P.Ok)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.binary(max_size=512))
def test_random_bytes_get_error_replies(shared_server, data):
    raw = Raw(shared_server[0])
    try:
        rep = raw.send_raw(data, timeout=2.0)
        # Random bytes are (almost) never a valid request; a valid one-way one gets no reply.
        assert rep is None or isinstance(rep, (P.Error, P.Ok)), rep
        _assert_alive(raw)
    finally:
        raw.close()


hostile = st.one_of(
    st.builds(P.Get, client=st.integers(0, 2**63 - 1), keys=st.lists(st.binary(min_size=1, max_size=64), max_size=50)),
    st.builds(P.Release, client=st.integers(0, 2**63 - 1), slots=st.lists(st.integers(0, 2**40 - 1), max_size=50)),
    st.builds(P.Commit, client=st.integers(0, 2**63 - 1), keys=st.lists(st.binary(min_size=16, max_size=16), max_size=5),
              slots=st.lists(st.integers(0, 2**40 - 1), max_size=5)),
    st.builds(P.Allocate, client=st.integers(0, 2**63 - 1), n=st.integers(1, P.MAX_KEYS)),
    st.builds(P.Hello, version=st.integers(-5, 5), label=st.text(max_size=20), token=st.text(max_size=10),
              layout=st.one_of(st.none(), st.builds(P.LayoutMsg, num_layers=st.integers(1, 64),
                                                    tokens=st.integers(1, 512), width=st.integers(1, 4096),
                                                    dtype=st.sampled_from(["float16", "bogus", "uint8"])))),
)


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(msg=hostile)
def test_hostile_structs_get_errors_and_server_keeps_serving(shared_server, msg):
    addr = shared_server[0]
    raw = Raw(addr)
    try:
        rep = raw.call(msg)
        if isinstance(msg, P.Hello) and isinstance(rep, P.Welcome):  # the one legitimate hello

            assert msg.version == P.PROTOCOL_VERSION and (msg.layout is None or P.layout_from_msg(msg.layout) == LAYOUT)
        elif not isinstance(msg, P.Release):
            assert isinstance(rep, P.Error), rep  # unknown client id, bad layout, bad version
        _assert_alive(raw)
    finally:
        raw.close()


def test_hostile_requests_of_a_real_session(shared_server):
    addr = shared_server[0]
    victim = RemoteStore(client_config(addr), LAYOUT, "m")
    raw = Raw(addr)
    try:
        assert victim.put(key(7000), payload(7000))
        (vref,) = victim.get([key(7000)])
        w = raw.hello()
        me = w.client
        # Oversize message: refused with an error, not decoded.
        assert raw.send_raw(b"\x00" * (P.MAX_MESSAGE_BYTES + 1)).code == "too_large"
        # Too many keys: schema violation.
        assert raw.call(P.Lookup(client=me, keys=[key(1)] * (P.MAX_KEYS + 1))).code == "bad_message"
        # Wrong layout for this server's store.

        bad = ChunkLayout(2, 16, 16, torch.float16)
        assert raw.call(P.Hello(layout=P.layout_to_msg(bad))).code == "layout"
        # Huge allocate: capped at the per-client limit (half the slots), nothing evicted beyond.
        rep = raw.call(P.Allocate(client=me, n=P.MAX_KEYS))
        assert isinstance(rep, P.Slots) and len(rep.slots) == w.max_refs == w.num_slots // 2
        assert raw.call(P.Allocate(client=me, n=5)).slots == []
        # Release slots this client never got (incl. the victim's slot): ignored.
        raw.sock.send(P.encode(P.Release(client=me, slots=[vref.slot, vref.slot, 2**40 - 1])))
        # Commit slots it does not own: nothing committed.
        assert raw.call(P.Commit(client=me, keys=[key(1)], slots=[vref.slot])).n == 0
        assert raw.call(P.Commit(client=me, keys=[key(1), key(2)], slots=[1])).code == "bad_message"
        # The victim's chunk is intact and still referenced for it.
        assert torch.equal(vref.data, payload(7000)) and vref.valid()
        # Bye releases everything the raw client allocated.
        assert isinstance(raw.call(P.Bye(client=me)), P.Ok)
        assert raw.call(P.Lookup(client=me, keys=[key(1)])).code == "unknown_client"
        vref.release()
        spare = len(victim._reserve)  # slots the victim keeps for its next saves
        assert wait_for(lambda: victim.stats().get("client_refs") == spare, 5)
        st_ = victim.stats()
        assert st_["free_slots"] == st_["num_slots"] - st_["cpu_chunks"] - spare
        _assert_alive(raw)
    finally:
        raw.close()
        victim.close()


session_ops = st.one_of(
    st.builds(lambda n: P.Get(keys=[key(i) for i in range(n)]), st.sampled_from([0, 1, 100, P.MAX_KEYS])),
    st.builds(lambda ks: P.Lookup(keys=ks), st.lists(st.binary(min_size=1, max_size=64), max_size=20)),
    st.builds(lambda sl: P.Release(slots=sl), st.lists(st.integers(0, 2**40 - 1), max_size=20)),
    st.builds(lambda sl: P.Commit(keys=[key(99)] * len(sl), slots=sl), st.lists(st.integers(0, 64), max_size=5)),
    st.builds(lambda n: P.Allocate(n=n), st.integers(1, P.MAX_KEYS)),
    st.builds(lambda n: P.Lease(keys=[key(i) for i in range(n)]), st.sampled_from([1, P.MAX_KEYS])),
    st.builds(lambda ids: P.Unlease(ids=ids), st.lists(st.integers(0, 2**62), max_size=5)),
    st.builds(lambda t: P.Flush(timeout_s=t), st.floats(0, 0.01)),
)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(ops=st.lists(session_ops, min_size=1, max_size=8))
def test_hostile_sequences_in_a_real_session_leave_others_intact(shared_server, ops):
    addr = shared_server[0]
    raw = Raw(addr)
    try:
        me = raw.hello().client
        for op in ops:
            op.client = me
            raw.sock.send(P.encode(op))  # one-way ones get no answer; the Ping below orders everything
        while True:
            rep = raw.call(P.Ping(rid=424242, client=me))
            if rep is not None and rep.rid == 424242:
                assert isinstance(rep, P.Ok)
                break
        raw.call(P.Bye(client=me))
        with RemoteStore(client_config(addr), LAYOUT, "m", reserve=1) as s:
            assert s.put(key(7777), payload(7777))
            (ref,) = s.get([key(7777)])
            assert torch.equal(ref.data, payload(7777))
            ref.release()
    finally:
        raw.close()


# ------------------------------------------------------------------ a client dies mid-save
def _dying_client(addr: str, ready) -> None:
    store = RemoteStore(client_config(addr), LAYOUT, "m")
    assert store.put(key(9000), payload(9000))
    refs = [store.allocate() for _ in range(3)]
    refs[0].data[: LAYOUT.nbytes // 2] = 7  # half-written chunk, never committed
    held = store.get([key(9000)])
    assert held[0] is not None
    ready.set()
    time.sleep(60)


def test_killed_client_leaks_no_slot_and_shows_no_half_written_chunk(shared_server):
    addr = shared_server[0]
    with RemoteStore(client_config(addr), LAYOUT, "m") as obs:
        assert wait_for(lambda: obs.stats().get("clients") == 1, TIMEOUT * 5)  # sessions of earlier tests gone
        base = obs.stats()
        ctx = mp.get_context("spawn")
        ready = ctx.Event()
        p = ctx.Process(target=_dying_client, args=(addr, ready))
        p.start()
        assert ready.wait(60)
        during = obs.stats()
        assert during["client_refs"] >= 4 and during["clients"] == base["clients"] + 1
        os.kill(p.pid, signal.SIGKILL)
        p.join(10)
        # After the client timeout its session goes: references released, slots free again.
        assert wait_for(lambda: obs.stats().get("clients") == base["clients"], TIMEOUT * 5)
        after = obs.stats()
        assert after["client_refs"] == 0
        assert after["free_slots"] == after["num_slots"] - after["cpu_chunks"]
        assert obs.lookup([key(9000)]) == 1  # the committed chunk stays
        assert obs.contains([key(9001)]) == [False]


def test_slots_of_a_stalled_live_client_are_never_handed_to_another(shared_server):
    """A client silent past the timeout loses its session, but not its slots while it lives.

    (The hole this closes: a stalled engine wakes up and finishes a copy into a slot the
    server had meanwhile given to another client, overwriting that client's chunk.)
    """
    addr = shared_server[0]
    with RemoteStore(client_config(addr), LAYOUT, "m") as a, RemoteStore(client_config(addr), LAYOUT, "m") as b:
        ref = a.allocate()
        assert ref.valid()
        a._heartbeat_s = 1e9  # a stalled process: no pings
        assert wait_for(lambda: b.stats().get("clients") == 1, TIMEOUT * 5)
        assert b.stats()["quarantined_refs"] >= 1  # this process lives: its slots are kept aside
        refs = b.allocate_many(b._welcome.max_refs)
        assert refs and ref.slot not in [r.slot for r in refs] and ref.valid()
        for r in refs:
            r.release()
        # The stalled client recovers: its next call finds its session gone and it reconnects.
        ref.data[:] = 5  # the late copy lands in a slot nobody else holds
        assert a.lookup([key(1)]) == 0
        assert a.wait_connected(5) and a.put(key(8000), payload(8000))
        a.commit(key(8001), ref)  # a reference of the dead session: dropped, not committed
        assert b.lookup([key(8000)]) == 1 and b.lookup([key(8001)]) == 0
        (got,) = b.get([key(8000)])
        assert torch.equal(got.data[: LAYOUT.nbytes], payload(8000))
        got.release()


def _stalling_client(addr: str, slots, ready) -> None:
    store = RemoteStore(client_config(addr), LAYOUT, "m")
    refs = [store.allocate() for _ in range(3)]
    slots.put([r.slot for r in refs])
    ready.set()
    time.sleep(120)


def test_stopped_client_keeps_its_slots_until_it_is_killed(shared_server):
    addr = shared_server[0]
    with RemoteStore(client_config(addr), LAYOUT, "m") as obs:
        assert wait_for(lambda: obs.stats().get("clients") == 1, TIMEOUT * 5)
        base = obs.stats()
        ctx = mp.get_context("spawn")
        ready, q = ctx.Event(), ctx.Queue()
        p = ctx.Process(target=_stalling_client, args=(addr, q, ready))
        p.start()
        try:
            assert ready.wait(60)
            theirs = set(q.get(timeout=10))
            os.kill(p.pid, signal.SIGSTOP)
            assert wait_for(lambda: obs.stats().get("clients") == base["clients"], TIMEOUT * 5)
            st = obs.stats()
            assert st["quarantined_refs"] >= base["quarantined_refs"] + len(theirs)
            assert st["free_slots"] <= base["free_slots"] - len(theirs)
            mine = obs.allocate_many(obs._welcome.max_refs)
            assert mine and not theirs & {r.slot for r in mine}
            for r in mine:
                r.release()
        finally:
            os.kill(p.pid, signal.SIGKILL)
            p.join(10)
        # The process is gone: its slots return to the pool.
        assert wait_for(lambda: obs.stats().get("quarantined_refs") == base["quarantined_refs"], TIMEOUT * 5)
        # (>=: allocating every free slot above may have evicted cached chunks, freeing theirs too)
        assert wait_for(lambda: obs.stats().get("free_slots") >= base["free_slots"], TIMEOUT * 5)


# ------------------------------------------------------------------ the server dies and comes back
def test_dead_server_means_misses_then_reconnect_after_restart():
    tmp = tempfile.mkdtemp(prefix="kvs-", dir="/tmp")
    addr = f"ipc://{tmp}/s.sock"
    proc = start_server(addr)
    store = RemoteStore(client_config(addr), LAYOUT, "m")
    try:
        assert store.put(key(1), payload(1))
        old_shm = store._region.path
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        t0 = time.monotonic()
        assert store.lookup([key(1)]) == 0
        assert store.get([key(1)]) == [None]
        assert store.allocate() is None
        assert store.contains([key(1)]) == [False]
        assert not store.put(key(2), payload(2))
        assert store.lease([key(1)]).ids == []
        assert time.monotonic() - t0 < 3 * 0.5 + 1  # at most one op timeout, then immediate misses
        proc = start_server(addr)
        assert not os.path.exists(old_shm)  # the restarted server removed its dead predecessor's file
        assert store.wait_connected(10)
        assert store._region.path != old_shm  # remapped
        assert store.put(key(3), payload(3))
        (ref,) = store.get([key(3)])
        assert torch.equal(ref.data, payload(3))
        ref.release()
    finally:
        store.close()
        proc.terminate()
        assert proc.wait(30) == 0
        shutil.rmtree(tmp, ignore_errors=True)


def test_a_region_the_background_thread_maps_is_pinned_by_the_next_get_or_allocate(monkeypatch):
    """vLLM captures CUDA graphs at start-up; a cudaHostRegister on another thread meanwhile breaks
    the capture and the engine dies. Seen on an H100: a P/D prefill engine's first Hello timed out
    while the server reserved 64 GiB, the background thread connected and pinned the region during
    the capture. The background thread never pins; the thread that loads or saves does."""
    pins: list[str] = []
    real_pin = SharedRegion.pin

    def pin(region: SharedRegion) -> bool:
        pins.append(threading.current_thread().name)
        return real_pin(region)

    monkeypatch.setattr(SharedRegion, "pin", pin)
    me = threading.current_thread().name
    tmp = tempfile.mkdtemp(prefix="kvs-", dir="/tmp")
    addr = f"ipc://{tmp}/s.sock"
    store = RemoteStore(client_config(addr), LAYOUT, "m", pin=True)  # no server yet: not connected
    proc = None
    try:
        assert not store.connected
        for restart in range(2):  # the first connection, then one after the server restarted
            proc = start_server(addr)
            assert store.wait_connected(10)
            assert pins == [me] * restart  # mapped by the background thread, not pinned there
            assert store.put(key(restart), payload(restart))  # allocates: pinned here, once
            (ref,) = store.get([key(restart)])
            assert torch.equal(ref.data, payload(restart))
            ref.release()
            assert pins == [me] * (restart + 1)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
            assert store.lookup([key(restart)]) == 0  # the session is gone: reconnects in the background
        proc = None
    finally:
        store.close()
        if proc is not None:
            proc.terminate()
            proc.wait(30)
        shutil.rmtree(tmp, ignore_errors=True)


def test_a_reconnect_in_the_background_holds_the_lookups_no_longer_than_connect_timeout():
    """The first Hello may take long (the server opens its store) and the constructor waits for it;
    the background thread does not: it connects under the client's lock, which every lookup of the
    engine's thread takes. A server that answers pings and never welcomes holds a lookup for
    connect_timeout_s at most (it held it for the whole 60 s Hello wait)."""
    tmp = tempfile.mkdtemp(prefix="kvs-", dir="/tmp")
    addr = f"ipc://{tmp}/s.sock"
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(addr)
    stop = threading.Event()
    hellos = []

    def serve() -> None:  # Ping: Ok; Hello: no answer, as a server stuck opening its store
        while not stop.is_set():
            if not sock.poll(20):
                continue
            frames = sock.recv_multipart()
            req = P.decode_request(frames[-1])
            if isinstance(req, P.Ping):
                sock.send_multipart(frames[:-1] + [P.encode(P.Ok(rid=req.rid))])
            elif isinstance(req, P.Hello):
                hellos.append(time.monotonic())

    server_thread = threading.Thread(target=serve, daemon=True)
    server_thread.start()
    store = RemoteStore(client_config(addr), LAYOUT, "m", connect=False)  # connect_timeout_s 0.5
    try:
        assert wait_for(lambda: hellos, 5), "the background thread sent no Hello"
        t0 = time.monotonic()
        assert store.lookup([key(1)]) == 0
        assert time.monotonic() - t0 < 0.5 + 0.5
    finally:
        store.close()
        stop.set()
        server_thread.join(5)
        sock.close(0)
        ctx.term()
        shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------ SIGTERM flushes to disk
def test_sigterm_flushes_write_behind_to_disk(tmp_path):
    from kvtier.store import Store

    disk = tmp_path / "disk"
    with server(None, "--tiers", "cpu,disk", "--disk-path", str(disk)) as (addr, proc):
        with RemoteStore(client_config(addr), LAYOUT, "m") as s:
            for i in range(20):
                assert s.put(key(i), payload(i))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    cfg = KVTierConfig(tiers=("cpu", "disk"), disk_path=str(disk), cpu_bytes=64 * LAYOUT.nbytes)
    with Store(cfg, LAYOUT, pin=False) as fresh:
        refs = fresh.get([key(i) for i in range(20)])
        assert all(r is not None and torch.equal(r.data, payload(i)) for i, r in enumerate(refs))
        for r in refs:
            r.release()


# ------------------------------------------------------------------ TCP needs the token
def test_tcp_requires_the_token_and_a_fixed_layout_rejects_others():
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    addr = f"tcp://127.0.0.1:{port}"
    layout_args = ("--num-layers", "2", "--kv-heads", "1", "--head-size", "8", "--dtype", "float16",
                   "--chunk-size", "16")
    with server(addr, *layout_args, env={"KVTIER_SERVER_TOKEN": "s3cret"}) as (addr, _):
        with RemoteStore(client_config(addr, server_token="wrong"), LAYOUT, "m") as bad:
            assert not bad.connected and bad.lookup([key(1)]) == 0 and bad.allocate() is None
        with RemoteStore(client_config(addr, server_token="s3cret"), LAYOUT, "m") as good:
            assert good.connected and good.put(key(1), payload(1)) and good.lookup([key(1)]) == 1
        other = ChunkLayout(2, 16, 16, torch.float16)
        with RemoteStore(client_config(addr, server_token="s3cret"), other, "m") as wrong_layout:
            assert not wrong_layout.connected and wrong_layout.lookup([key(1)]) == 0
    # No token, TCP: refused at start.
    r = subprocess.run([sys.executable, "-m", "kvtier.cli", "serve", "--address", addr], capture_output=True,
                       env={k: v for k, v in os.environ.items() if k != "KVTIER_SERVER_TOKEN"})
    assert r.returncode != 0 and b"token" in r.stderr


def test_health_command_exit_codes(shared_server):
    ok = subprocess.run([sys.executable, "-m", "kvtier.cli", "health", shared_server[0]], capture_output=True)
    assert ok.returncode == 0
    bad = subprocess.run([sys.executable, "-m", "kvtier.cli", "health", "ipc:///tmp/kvtier-none/x.sock",
                          "--timeout", "0.3"], capture_output=True)
    assert bad.returncode == 1


def test_protocol_never_pickles():
    import pickle

    with pytest.raises((msgspec.DecodeError, msgspec.ValidationError)):
        P.decode_request(pickle.dumps({"op": "ping"}))


# ------------------------------------------------------------------ metrics, namespaces
def test_prometheus_metrics_over_http():
    import urllib.request

    from kvtier.local_redis import free_port

    port = free_port()
    with server(None, "--metrics-port", str(port)) as (addr, _):
        with RemoteStore(client_config(addr), LAYOUT, "m") as c:
            assert c.put(key(1), payload(1)) and c.lookup([key(1), key(2)]) == 1
            body = ""

            def scraped() -> bool:
                nonlocal body
                try:
                    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
                except OSError:
                    return False
                return 'kvtier_server_requests_total{op="lookup"}' in body

            assert wait_for(scraped, 10), body[-2000:]
    assert "kvtier_server_clients 1.0" in body and "kvtier_server_free_slots" in body
    assert "kvtier_server_quarantined_refs 0.0" in body


def test_two_model_namespaces_on_one_server_never_see_each_other(shared_server):
    from kvtier.keys import Namespace, chunk_keys

    addr = shared_server[0]
    tokens = np.arange(4 * LAYOUT.tokens) % 1000
    ns_a = Namespace("model-a", "float16", LAYOUT.num_layers, 1, 8)
    ns_b = Namespace("model-b", "float16", LAYOUT.num_layers, 1, 8)
    keys_a, keys_b = chunk_keys(ns_a, tokens, LAYOUT.tokens), chunk_keys(ns_b, tokens, LAYOUT.tokens)
    with RemoteStore(client_config(addr), LAYOUT, "a") as a, RemoteStore(client_config(addr), LAYOUT, "b") as b:
        for i, k in enumerate(keys_a):
            assert a.put(k, payload(100 + i))
        assert a.lookup(keys_a) == 4
        assert b.lookup(keys_b) == 0 and b.contains(keys_b) == [False] * 4
        for i, k in enumerate(keys_b):
            assert b.put(k, payload(200 + i))
        for store, keys, seed in ((a, keys_a, 100), (b, keys_b, 200)):
            refs = store.get(keys)
            assert all(torch.equal(r.data[: LAYOUT.nbytes], payload(seed + i)) for i, r in enumerate(refs))
            for r in refs:
                r.release()


def test_one_way_commits_are_seen_by_another_client_once_published(shared_server):
    """A prefill instance commits its step's chunks one way (no reply awaited); before its response
    leaves, ``publish_commits`` makes them visible to the decode instance's client."""
    addr = shared_server[0]
    keys = [key(900 + i) for i in range(3)]
    with (RemoteStore(client_config(addr), LAYOUT, "p") as prefill,
          RemoteStore(client_config(addr), LAYOUT, "d") as decode):
        for i, k in enumerate(keys):
            ref = prefill.allocate()
            ref.data[: LAYOUT.nbytes].copy_(payload(900 + i))
            prefill.commit(k, ref)
        assert prefill.publish_commits()
        assert decode.lookup(keys) == 3


def test_remote_put_of_a_wrong_size_is_refused_before_taking_a_slot(shared_server):
    addr, _ = shared_server
    with RemoteStore(client_config(addr), LAYOUT, "m") as s:
        for _ in range(80):  # more than the server's 32 slots
            with pytest.raises(ValueError, match=f"must be {LAYOUT.nbytes} bytes"):
                s.put(key(900), np.zeros(3, dtype=np.uint8))
        assert s.put(key(901), payload(901))


def test_start_up_failure_releases_shared_memory_and_socket(tmp_path):
    """Issue 14.3: `kvtier serve --metrics-port <busy>` exited but left its /dev/shm segment
    (cpu_bytes of RAM) and its socket behind."""
    import socket as so

    busy = so.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    sock_path = f"/tmp/kvs-busy-{os.getpid()}.sock"
    before = set(os.listdir("/dev/shm"))
    try:
        r = subprocess.run([sys.executable, "-m", "kvtier.cli", "serve", "--address", f"ipc://{sock_path}",
                            "--tiers", "cpu", "--cpu-bytes", "8MiB", "--num-layers", "2", "--kv-heads", "1",
                            "--head-size", "8", "--dtype", "float16", "--chunk-size", "16",
                            "--metrics-port", str(port), "--log-level", "WARNING"],
                           capture_output=True, text=True, timeout=60)
    finally:
        busy.close()
    assert r.returncode != 0
    assert f"--metrics-port {port}" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert not os.path.exists(sock_path), "the ipc socket was left behind"
    left = [n for n in set(os.listdir("/dev/shm")) - before if n.startswith("kvtier-")]
    assert not left, f"shared memory left behind: {left}"


_COPY_SCRIPT = r"""
import os, sys
import numpy as np, torch
from kvtier.config import KVTierConfig
from kvtier.hostcopy import copy_bytes
from kvtier.layout import ChunkLayout
from kvtier.server.client import RemoteStore
from kvtier.transfer import PagedKV, gather, scatter

addr, threads = sys.argv[1], int(sys.argv[2])
torch.set_num_threads(threads)
L, T, H, D, BS, N = 4, 64, 8, 128, 16, 4  # 1 MiB chunks: big enough for torch to split a copy across threads
layout = ChunkLayout(L, T, H * D, torch.bfloat16)
chunks = [np.random.default_rng(threads * 100 + i).integers(0, 256, layout.nbytes, dtype=np.uint8) for i in range(N)]
keys = [(threads * 100 + i).to_bytes(16, "little") for i in range(N)]
store = RemoteStore(KVTierConfig(server=addr, op_timeout_s=5), layout, "copies", pin=False)
assert store.wait_connected(10)
[r.release() for r in store.get(keys[:1]) if r is not None]  # every thread of the client exists now
nb = 2 * N * T // BS
zeros = lambda *shape: torch.from_numpy(np.zeros(shape, dtype=np.int16)).view(torch.bfloat16)
paged = PagedKV([zeros(nb, H, BS, 2 * D) for _ in range(L)], "cpu", BS)  # (torch.zeros would start the pool)
mapping = (torch.from_numpy(np.random.default_rng(threads).permutation(nb)[:N * T // BS]).view(-1, 1) * BS
           + torch.arange(BS)).reshape(-1)
out = torch.from_numpy(np.zeros((N, layout.nbytes), dtype=np.uint8))
back = [torch.from_numpy(np.zeros(layout.nbytes, dtype=np.uint8)) for _ in range(N)]
tasks = len(os.listdir("/proc/self/task"))

assert all(store.put(k, c) for k, c in zip(keys, chunks))  # payload -> shared slot
refs = store.get(keys)
for i, r in enumerate(refs):
    copy_bytes(out[i], r.data)  # shared slot -> private buffer
assert all(np.array_equal(out[i].numpy(), chunks[i]) for i in range(N))
scatter(paged, mapping, [r.data for r in refs])  # shared slots -> paged KV (a CPU engine's load)
gather(paged, mapping, back)  # paged KV -> chunks (its save)
assert all(np.array_equal(b.numpy(), c) for b, c in zip(back, chunks))
for r in refs:
    r.release()
grown = len(os.listdir("/proc/self/task")) - tasks
store.close()
assert grown == 0, f"{grown} threads appeared while kvtier copied chunk bytes: torch's thread pool ran"
print("OK")
"""


@pytest.mark.parametrize("threads", [1, 2, 4])
def test_client_copies_do_not_depend_on_torch_threads(threads):
    """Issue 'costs that grow with load', item 4: with torch's default intra-op pool in each of
    several client processes, host copies of chunk bytes through torch (copy_, index_copy_) ran at a
    fraction of memcpy speed. kvtier's copies (put, copy_bytes, the CPU scatter/gather) must give
    the right bytes at any torch.set_num_threads, and never start torch's pool: a fresh process
    has no OpenMP worker threads until torch first splits work across them."""
    with server(cpu_chunks=16 * 1024) as (addr, _):  # 16 MiB of 1 KiB units: 16 chunks of 1 MiB
        r = subprocess.run([sys.executable, "-c", _COPY_SCRIPT, addr, str(threads)], capture_output=True,
                           text=True, timeout=120)
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout[-2000:] + r.stderr[-3000:]
