"""The redis tier against real redis-server processes: batches, faults, corruption, cluster."""

import time

import numpy as np
import pytest

from conftest import SMALL_LAYOUT, check_bytes, make_keys, make_payload
from kvtier.layout import HEADER_SIZE
from kvtier.tiers.redis import RedisTier

N = SMALL_LAYOUT.nbytes


def zeros(n: int = 1) -> list[np.ndarray]:
    return [np.zeros(N, dtype=np.uint8) for _ in range(n)]


def test_pipelined_batches_keep_order(redis_server):
    tier = RedisTier([redis_server.url], SMALL_LAYOUT, label="m", prefix="t1:")
    keys = make_keys(60)
    assert all(tier.put(keys[:50], [make_payload(i) for i in range(50)]))
    rng = np.random.default_rng(0)
    order = list(rng.permutation(60))
    asked = [keys[i] for i in order]
    assert tier.contains(asked) == [i < 50 for i in order]
    assert check_bytes(tier, asked, order) == [i < 50 for i in order]
    with redis_server.client() as c:
        names = sorted(c.keys("t1:*"))
        assert names == sorted(b"t1:" + k.hex().encode() for k in keys[:50])
        assert c.strlen(names[0]) == HEADER_SIZE + N
        assert c.ttl(names[0]) == -1  # no expiry unless asked
    s = tier.stats()
    assert (s.puts, s.hits, s.misses, s.errors) == (50, 50, 10, 0)
    assert {c.key for c in tier.scan()} == set(keys[:50])


def test_ttl_sets_expiry(redis_server):
    tier = RedisTier([redis_server.url], SMALL_LAYOUT, ttl_s=100)
    (k,) = make_keys(1)
    tier.put([k], [make_payload(0)])
    with redis_server.client() as c:
        assert 0 < c.ttl(b"kvtier:" + k.hex().encode()) <= 100


def test_server_killed_mid_run_then_back(redis_server):
    tier = RedisTier([redis_server.url], SMALL_LAYOUT, connect_timeout_s=0.5, op_timeout_s=0.5,
                     retry_after_s=0.3)
    keys = make_keys(10)
    assert all(tier.put(keys[:5], [make_payload(i) for i in range(5)]))
    redis_server.kill()
    t0 = time.monotonic()
    calls = 0
    while time.monotonic() - t0 < 1.0:  # keep calling through a few breaker periods
        assert tier.contains(keys) == [False] * 10
        assert check_bytes(tier, keys, list(range(10))) == [False] * 10
        assert tier.put(keys[5:], [make_payload(i) for i in range(5, 10)]) == [False] * 5
        tier.delete(keys[:1])
        calls += 4
    assert time.monotonic() - t0 < 5
    s = tier.stats()
    assert s.errors >= 1 and s.extra["skipped"] > 0 and s.extra["breaker_open"] == 1
    assert s.errors < calls  # the breaker spared most calls a network attempt

    redis_server.restart()  # same port, empty (no persistence)
    time.sleep(0.35)
    assert tier.put(keys[5:], [make_payload(i) for i in range(5, 10)]) == [True] * 5
    assert check_bytes(tier, keys, list(range(10))) == [False] * 5 + [True] * 5
    assert tier.stats().extra["breaker_open"] == 0


def test_frozen_server_costs_one_timeout_then_breaker(redis_server):
    tier = RedisTier([redis_server.url], SMALL_LAYOUT, op_timeout_s=0.3, retry_after_s=1.0)
    keys = make_keys(3)
    tier.put(keys, [make_payload(i) for i in range(3)])
    redis_server.pause()
    try:
        t0 = time.monotonic()
        for _ in range(20):
            assert check_bytes(tier, keys, [0, 1, 2]) == [False] * 3
            assert tier.contains(keys) == [False] * 3
        assert time.monotonic() - t0 < 5  # one timeout, then answers without the network
        assert tier.stats().errors == 1
    finally:
        redis_server.resume()
    time.sleep(1.05)
    assert check_bytes(tier, keys, [0, 1, 2]) == [True] * 3


def test_no_caller_waits_out_a_probe_of_a_frozen_server(redis_server):
    """After the call that finds a server gone, no caller probes it: a lookup may run on the
    engine's thread, and a probe of a host that does not answer costs a whole timeout. The
    breaker's own thread probes, and closes it once the server answers again."""
    tier = RedisTier([redis_server.url], SMALL_LAYOUT, op_timeout_s=2.0, retry_after_s=0.2)
    keys = make_keys(3)
    tier.put(keys, [make_payload(i) for i in range(3)])
    redis_server.pause()
    try:
        assert tier.contains(keys) == [False] * 3  # finds it frozen: one timeout
        t_end = time.monotonic() + 3.0  # past several probes, each stuck for the 2 s timeout
        slowest = 0.0
        while time.monotonic() < t_end:
            t = time.monotonic()
            assert tier.contains(keys) == [False] * 3
            slowest = max(slowest, time.monotonic() - t)
            time.sleep(0.02)
        assert slowest < 1.0
    finally:
        redis_server.resume()
    deadline = time.monotonic() + 10
    while tier.contains(keys) != [True] * 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert tier.contains(keys) == [True] * 3 and tier.stats().extra["breaker_open"] == 0
    tier.close()


def test_down_at_start_then_up(redis_server):
    port = redis_server.port
    redis_server.kill()
    tier = RedisTier([f"redis://127.0.0.1:{port}"], SMALL_LAYOUT, retry_after_s=0.2)
    (k,) = make_keys(1)
    assert tier.put([k], [make_payload(1)]) == [False]
    redis_server.start()
    time.sleep(0.25)
    assert tier.put([k], [make_payload(1)]) == [True]
    assert check_bytes(tier, [k], [1]) == [True]


def test_corrupt_values_are_counted_misses_and_removed(redis_server):
    tier = RedisTier([redis_server.url], SMALL_LAYOUT)
    keys = make_keys(5)
    tier.put(keys, [make_payload(i) for i in range(5)])
    names = [b"kvtier:" + k.hex().encode() for k in keys]
    with redis_server.client() as c:
        good = c.get(names[0])
        c.set(names[0], b"garbage")  # not a chunk at all
        c.set(names[1], good[:-10])  # truncated
        flipped = bytearray(good)
        flipped[HEADER_SIZE + 100] ^= 0xFF
        c.set(names[2], bytes(flipped))  # a flipped payload bit
        c.set(names[3], good)  # a valid chunk, but of another key
    assert check_bytes(tier, keys, list(range(5))) == [False, False, False, False, True]
    s = tier.stats()
    assert (s.corrupt, s.hits, s.misses) == (4, 1, 4)
    with redis_server.client() as c:
        assert c.exists(*names[:4]) == 0  # removed: later reads do not pay for them again
        assert c.exists(names[4]) == 1


def test_prefixes_separate_users_of_one_server(redis_server):
    a = RedisTier([redis_server.url], SMALL_LAYOUT, prefix="a:")
    b = RedisTier([redis_server.url], SMALL_LAYOUT, prefix="b:")
    (k,) = make_keys(1)
    a.put([k], [make_payload(1)])
    assert b.contains([k]) == [False]
    assert {c.key for c in b.scan()} == set()
    assert check_bytes(a, [k], [1]) == [True]


# ---- cluster ------------------------------------------------------------------------------

def test_cluster_batches_across_slots_and_nodes(redis_cluster):
    tier = RedisTier(redis_cluster.urls, SMALL_LAYOUT, label="c", prefix="cl1:")
    keys = make_keys(60)
    owners = {redis_cluster.node_of(b"cl1:" + k.hex().encode()) for k in keys}
    assert owners == {0, 1, 2}  # the batch really spans the three nodes
    assert all(tier.put(keys[:40], [make_payload(i) for i in range(40)]))
    order = list(np.random.default_rng(1).permutation(60))
    asked = [keys[i] for i in order]
    assert tier.contains(asked) == [i < 40 for i in order]
    assert check_bytes(tier, asked, order) == [i < 40 for i in order]
    counts = []
    for node in redis_cluster.nodes:
        with node.client() as c:
            counts.append(len(c.keys("cl1:*")))
    assert sum(counts) == 40 and all(n > 0 for n in counts)
    assert {c.key for c in tier.scan()} == set(keys[:40])
    tier.delete(keys)
    assert tier.contains(keys) == [False] * 60


def test_cluster_node_killed_its_keys_miss_others_hit(redis_cluster):
    tier = RedisTier(redis_cluster.urls[:1], SMALL_LAYOUT, cluster=True, prefix="cl2:",
                     connect_timeout_s=0.5, op_timeout_s=0.5, retry_after_s=0.3)
    keys = make_keys(45)
    seeds = list(range(45))
    assert all(tier.put(keys, [make_payload(i) for i in seeds]))
    owner = [redis_cluster.node_of(b"cl2:" + k.hex().encode()) for k in keys]
    victim = 1
    redis_cluster.nodes[victim].kill()
    try:
        t0 = time.monotonic()
        for _ in range(5):
            expect = [o != victim for o in owner]
            assert check_bytes(tier, keys, seeds) == expect
            assert tier.contains(keys) == expect
            assert tier.put(keys, [make_payload(i) for i in seeds]) == expect
        assert time.monotonic() - t0 < 5
        assert tier.stats().errors >= 1
    finally:
        redis_cluster.nodes[victim].start()  # same port and nodes.conf: it rejoins, empty
        redis_cluster.wait_ok()
    time.sleep(0.35)
    assert all(tier.put(keys, [make_payload(i) for i in seeds]))
    assert check_bytes(tier, keys, seeds) == [True] * 45


def test_cluster_seed_list_with_a_dead_seed(redis_cluster):
    dead = "redis://127.0.0.1:1"  # nothing listens there
    tier = RedisTier([dead] + redis_cluster.urls[2:], SMALL_LAYOUT, prefix="cl3:", connect_timeout_s=0.3)
    keys = make_keys(10)
    assert all(tier.put(keys, [make_payload(i) for i in range(10)]))
    assert check_bytes(tier, keys, list(range(10))) == [True] * 10


@pytest.mark.parametrize("bad_url", ["redis://127.0.0.1:1"])
def test_cluster_all_seeds_dead_is_misses(bad_url):
    tier = RedisTier([bad_url], SMALL_LAYOUT, cluster=True, connect_timeout_s=0.3, retry_after_s=5)
    keys = make_keys(3)
    assert tier.contains(keys) == [False] * 3
    assert tier.put(keys, [make_payload(i) for i in range(3)]) == [False] * 3
    assert check_bytes(tier, keys, [0, 1, 2]) == [False] * 3
    assert list(tier.scan()) == []
    assert tier.stats().errors >= 1


def test_unix_socket_url(tmp_path):
    """Issue 14.4: unix:///path passed validation, then Store() raised TypeError (path=)."""
    from kvtier.config import ConfigError, KVTierConfig
    from kvtier.local_redis import RedisServer
    from kvtier.store import Store

    sock = tmp_path / "redis.sock"
    with RedisServer(extra_args=("--unixsocket", str(sock), "--unixsocketperm", "700")):
        cfg = KVTierConfig(tiers=("redis",), redis_url=(f"unix://{sock}",))
        with Store(cfg, SMALL_LAYOUT, pin=False) as store:
            keys = make_keys(2)
            assert store.put(keys[0], make_payload(3))
            assert store.flush(10)
            assert store.lookup(keys) == 1
            (ref, miss) = store.get(keys)
            assert miss is None
            with ref:
                assert np.array_equal(ref.data.numpy(), make_payload(3))
    with pytest.raises(ConfigError, match="unix socket serves one standalone server"):
        KVTierConfig(tiers=("redis",), redis_url=(f"unix://{sock}",), redis_cluster=True)


def test_op_timeout_bounds_every_concurrent_caller(redis_server):
    """Issue 14.8: with a stalled server and op_timeout_s=1, one caller waited 1 s but four
    concurrent callers waited up to 2 s (a retry after the wait)."""
    import threading

    tier = RedisTier([redis_server.url], SMALL_LAYOUT, op_timeout_s=1.0, connect_timeout_s=1.0)
    keys = make_keys(4)
    assert tier.contains(keys) == [False] * 4  # one pooled connection exists; the others are new
    waits: list[float] = []

    def call() -> None:
        t = time.monotonic()
        assert tier.contains(keys) == [False] * 4
        waits.append(time.monotonic() - t)

    redis_server.pause()
    try:
        threads = [threading.Thread(target=call) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
    finally:
        redis_server.resume()
    assert len(waits) == 4
    assert max(waits) < 1.5, f"waits {waits}: op_timeout_s=1 must bound every caller"
    tier.close()


def test_a_call_woken_by_another_callers_failure_is_not_retried(redis_server):
    """CI flake of the test above, made certain: the first caller to time out disconnects the
    node's pools, which wakes every other caller's read with the connection closed and no reply.
    That looked like a connection a restarted server had closed, so each retried on a new
    connection and waited its timeout again. A call with a 4 s timeout (a big read) woken that
    way at 1 s waited 5 s in all."""
    import threading

    slow = N / 3.5  # one chunk's read gets a 4 s socket timeout; a lookup, op_timeout_s = 1 s
    tier = RedisTier([redis_server.url], SMALL_LAYOUT, op_timeout_s=1.0, connect_timeout_s=1.0,
                     slow_bytes_per_s=slow)
    keys = make_keys(1)
    assert tier._timeout(N) == 4.0 and tier._timeout(0) == 1.0
    assert tier.contains(keys) == [False]
    waited: dict[str, float] = {}

    def read() -> None:
        t = time.monotonic()
        assert tier.get_into(keys, zeros()) == [False]
        waited["read"] = time.monotonic() - t

    redis_server.pause()
    try:
        reader = threading.Thread(target=read)
        reader.start()
        time.sleep(0.1)  # the read is waiting for its reply
        t = time.monotonic()
        assert tier.contains(keys) == [False]  # times out at 1 s, opens the breaker
        waited["lookup"] = time.monotonic() - t
        reader.join(10)
    finally:
        redis_server.resume()
    assert waited["lookup"] < 1.5, waited
    assert waited["read"] < 1.6, f"{waited}: the read was woken by the lookup's failure; it must not wait again"
    tier.close()


# ---- chunks in several values -------------------------------------------------------------
PIECE = 4096  # SMALL_LAYOUT's 16 KiB chunks in 4 values


def piece_names(prefix: bytes, key: bytes) -> list[bytes]:
    name = prefix + key.hex().encode()
    return [name] + [b"%s:{%s}:%d" % (name, name, i) for i in (1, 2, 3)]


def test_split_chunks_round_trip_with_ttl_and_scan_each_once(redis_server):
    tier = RedisTier([redis_server.url], SMALL_LAYOUT, label="p", prefix="p1:", piece_bytes=PIECE, ttl_s=100)
    keys = make_keys(6)
    assert tier.put(keys[:4], [make_payload(i) for i in range(4)]) == [True] * 4
    assert tier.contains(keys) == [True] * 4 + [False] * 2
    assert check_bytes(tier, keys, list(range(6))) == [True] * 4 + [False] * 2
    with redis_server.client() as c:
        names = piece_names(b"p1:", keys[0])
        assert [c.strlen(n) for n in names] == [HEADER_SIZE + PIECE, PIECE, PIECE, PIECE]
        assert all(0 < c.ttl(n) <= 100 for n in names)
        assert len(c.keys("p1:*")) == 16
    assert sorted(c.key for c in tier.scan()) == sorted(keys[:4])  # each chunk once, not each value
    from kvtier.tiers.scan import scan_redis

    assert sorted(c.key for c in scan_redis(redis_server.url, prefix="p1:")) == sorted(keys[:4])
    s = tier.stats()
    assert (s.puts, s.hits, s.misses, s.bytes_read) == (4, 4, 2, 4 * (HEADER_SIZE + N))


def test_a_missing_piece_is_a_miss_and_the_rest_is_removed(redis_server):
    """Redis evicted (or expired) one value of a chunk: a miss, never a partly old chunk."""
    tier = RedisTier([redis_server.url], SMALL_LAYOUT, prefix="p2:", piece_bytes=PIECE)
    keys = make_keys(3)
    tier.put(keys, [make_payload(i) for i in range(3)])
    with redis_server.client() as c:
        c.delete(piece_names(b"p2:", keys[1])[2])
    assert tier.contains(keys) == [True, False, True]
    assert check_bytes(tier, keys, [0, 1, 2]) == [True, False, True]
    s = tier.stats()
    assert (s.hits, s.misses, s.corrupt, s.extra["partial"]) == (2, 1, 0, 1)
    with redis_server.client() as c:
        assert c.exists(*piece_names(b"p2:", keys[1])) == 0
        assert c.exists(*piece_names(b"p2:", keys[0])) == 4
    # Without its first value a chunk is simply absent (a put that has not finished yet).
    with redis_server.client() as c:
        c.delete(piece_names(b"p2:", keys[2])[0])
    assert check_bytes(tier, keys[2:], [2]) == [False]
    assert tier.stats().extra["partial"] == 1


def test_a_corrupt_or_resized_piece_is_a_miss_and_removed(redis_server):
    tier = RedisTier([redis_server.url], SMALL_LAYOUT, prefix="p3:", piece_bytes=PIECE)
    keys = make_keys(4)
    tier.put(keys, [make_payload(i) for i in range(4)])
    with redis_server.client() as c:
        n0, n1, n2 = (piece_names(b"p3:", k) for k in keys[:3])
        last = bytearray(c.get(n0[3]))
        last[17] ^= 0x01  # one flipped bit in the last piece
        c.set(n0[3], bytes(last))
        c.set(n1[1], c.get(n1[1])[:-1])  # a piece one byte short
        c.set(n2[2], c.get(piece_names(b"p3:", keys[3])[2]))  # a piece of another chunk, right size
    assert check_bytes(tier, keys, [0, 1, 2, 3]) == [False, False, False, True]
    s = tier.stats()
    assert (s.corrupt, s.hits, s.misses) == (3, 1, 3)
    with redis_server.client() as c:
        assert c.exists(*n0, *n1, *n2) == 0


def test_delete_removes_every_piece(redis_server):
    tier = RedisTier([redis_server.url], SMALL_LAYOUT, prefix="p4:", piece_bytes=PIECE)
    keys = make_keys(3)
    tier.put(keys, [make_payload(i) for i in range(3)])
    tier.delete(keys[:2])
    with redis_server.client() as c:
        assert sorted(c.keys("p4:*")) == sorted(piece_names(b"p4:", keys[2]))
    assert tier.contains(keys) == [False, False, True]


def test_cluster_keeps_a_chunks_pieces_on_its_node(redis_cluster):
    """The {NAME} hash tag: every value of a chunk lives on the node of its first value, so a dead
    node costs its own chunks only (not every chunk that had one piece there)."""
    tier = RedisTier(redis_cluster.urls, SMALL_LAYOUT, prefix="clp:", piece_bytes=PIECE)
    keys = make_keys(30)
    assert all(tier.put(keys, [make_payload(i) for i in range(30)]))
    for k in keys:
        assert len({redis_cluster.node_of(n) for n in piece_names(b"clp:", k)}) == 1
    assert check_bytes(tier, keys, list(range(30))) == [True] * 30
    assert sorted(c.key for c in tier.scan()) == sorted(keys)
    tier.delete(keys)
    assert tier.contains(keys) == [False] * 30


def test_socket_timeout_grows_with_the_bytes_of_a_batch(redis_server):
    """op_timeout_s bounds small calls; a batch gets its bytes' time at slow_bytes_per_s (rounded up
    to op_timeout_s * 2**k). Here a server frozen for 1.2 s fails a small call (0.5 s) but not a
    get of 128 KiB at 40 KB/s (3.3 s -> 4 s)."""
    tier = RedisTier([redis_server.url], SMALL_LAYOUT, op_timeout_s=0.5, retry_after_s=0.2,
                     slow_bytes_per_s=40e3)
    assert tier._timeout(0) == tier._timeout(1000) == 0.5
    assert tier._timeout(8 * N) == 4.0
    keys = make_keys(8)
    assert all(tier.put(keys, [make_payload(i) for i in range(8)]))
    redis_server.pause()
    try:
        t0 = time.monotonic()
        assert tier.contains(keys[:1]) == [False]  # a small call: one op_timeout_s, then the breaker
        assert time.monotonic() - t0 < 1.0
    finally:
        redis_server.resume()
    time.sleep(0.25)
    assert tier.contains(keys[:1]) == [True]
    result: list = []

    def big_get() -> None:
        result.append(check_bytes(tier, keys, list(range(8))))

    redis_server.pause()
    try:
        import threading

        th = threading.Thread(target=big_get)
        th.start()
        time.sleep(1.2)
    finally:
        redis_server.resume()
    th.join(10)
    assert result == [[True] * 8]
    assert tier.stats().errors == 1  # the small call's only


def test_an_error_reply_is_a_miss_and_the_batch_stays_in_order(redis_server):
    """Reads parse the server's replies themselves (kvtier.tiers.resp), values received straight
    into the destinations: an error reply for one value (a key holding a list) is that chunk's
    miss, and the replies after it still land in their own destinations."""
    tier = RedisTier([redis_server.url], SMALL_LAYOUT, prefix="er:", piece_bytes=N // 3)
    keys = make_keys(6)
    assert all(tier.put(keys, [make_payload(i) for i in range(6)]))
    bad = tier._piece_names(tier._name(keys[2]))[1]  # the middle value of chunk 2
    with redis_server.client() as c:
        c.delete(bad)
        c.rpush(bad, b"x")
    assert check_bytes(tier, keys, list(range(6))) == [True, True, False, True, True, True]
    assert tier.stats().errors == 1
    assert check_bytes(tier, keys[3:], [3, 4, 5]) == [True] * 3  # the connection is still good


def test_commands_are_framed_around_the_callers_buffers():
    """Puts frame RESP around the payload's own buffers (no copy into one bytes) and send them
    with sendmsg: more buffers than one sendmsg takes, and a send buffer too small for one
    call, still arrive whole and in order."""
    import socket
    import threading

    from kvtier.tiers.resp import encode_command, send_parts

    assert b"".join(encode_command((b"SET", b"k", (b"ab", memoryview(b"cde")), b"EX", b"5"))) == (
        b"*5\r\n$3\r\nSET\r\n$1\r\nk\r\n$5\r\nabcde\r\n$2\r\nEX\r\n$1\r\n5\r\n")
    rng = np.random.default_rng(1)
    values = [rng.integers(0, 255, int(rng.integers(0, 40000)), dtype=np.uint8) for _ in range(1500)]
    parts = [p for i, v in enumerate(values) for p in encode_command((b"SET", b"%d" % i, memoryview(v)))]
    want = b"".join(bytes(p) for p in parts)
    a, b = socket.socketpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    got = bytearray()

    def receive():
        while len(got) < len(want):
            got.extend(b.recv(1 << 16))

    th = threading.Thread(target=receive)
    th.start()
    send_parts(a, parts)
    th.join(30)
    a.close()
    b.close()
    assert bytes(got) == want


def test_a_refused_write_is_a_counted_error_and_the_rest_keep_their_answers(redis_server):
    """A server that refuses SETs past its memory limit (OOM error replies): the chunks it took
    are True and readable, the refused ones False and counted errors; the connection stays good."""
    tier = RedisTier([redis_server.url], SMALL_LAYOUT, prefix="oom:")
    keys = make_keys(40)
    with redis_server.client() as c:
        used = int(c.info("memory")["used_memory"])
        c.config_set("maxmemory-policy", "noeviction")
        c.config_set("maxmemory", used + 12 * (N + HEADER_SIZE))
    try:
        ok = tier.put(keys, [make_payload(i) for i in range(40)])
    finally:
        with redis_server.client() as c:
            c.config_set("maxmemory", 0)
    assert 0 < sum(ok) < 40
    assert tier.stats().errors == 40 - sum(ok)
    assert tier.contains(keys) == ok
    assert check_bytes(tier, keys, list(range(40))) == ok
    assert all(tier.put(keys, [make_payload(i) for i in range(40)]))
    assert check_bytes(tier, keys, list(range(40))) == [True] * 40
