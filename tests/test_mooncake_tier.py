"""The mooncake tier against real mooncake_master / mooncake_client processes: faults, corruption,
registered memory, settings (the contract suite runs it too: test_tier_contract.py)."""

import json
import time

import numpy as np
import pytest
import torch

from conftest import SMALL_LAYOUT, bounded, check_bytes, make_keys, make_payload, require_mooncake
from kvtier.config import ConfigError, KVTierConfig
from kvtier.layout import HEADER_SIZE

N = SMALL_LAYOUT.nbytes


@pytest.fixture
def master():
    """A master of this test's own (tests here kill it)."""
    require_mooncake()
    from kvtier.local_mooncake import MooncakeMaster

    m = MooncakeMaster(extra_args=("--client_ttl=2",))  # a lost segment holder is dropped after 2 s
    yield m
    m.stop()


def tier_for(m, **kw):
    from kvtier.tiers.mooncake import MooncakeTier

    kw.setdefault("segment_bytes", 64 << 20)
    t = MooncakeTier(m.address, SMALL_LAYOUT, label="m", metadata_server=m.metadata_url, admin_url=m.admin_url,
                     retry_after_s=0.3, **kw)
    assert t.wait_connected(10)
    return t


def test_master_killed_mid_run_then_back(master):
    tier = tier_for(master)
    keys = make_keys(6)
    assert tier.put(keys[:3], [make_payload(i) for i in range(3)]) == [True] * 3
    master.kill()
    for _ in range(5):  # every call answers, quickly, with a miss: no exception, no hang
        assert bounded(lambda: tier.contains(keys), 10) == [False] * 6
        assert bounded(lambda: check_bytes(tier, keys[:3], range(3)), 10) == [False] * 3
        assert bounded(lambda: tier.put(keys[3:], [make_payload(i) for i in range(3, 6)]), 10) == [False] * 3
        time.sleep(0.2)
    s = tier.stats()
    assert s.errors >= 1 and s.extra["skipped"] >= 1 and s.extra["breaker_open"] == 1
    master.start()  # an empty master: the client mounts its segment again on its own
    deadline = time.monotonic() + 30
    while tier.put(keys[3:], [make_payload(i) for i in range(3, 6)]) != [True] * 3:
        assert time.monotonic() < deadline, "the tier did not recover after the master came back"
        time.sleep(0.3)
    assert check_bytes(tier, keys[3:], range(3, 6)) == [True] * 3
    assert tier.stats().extra["breaker_open"] == 0
    tier.close()


def test_segment_holder_killed(master):
    """Chunks in a lost segment are misses (never wrong bytes, never an exception); the rest of
    the pool keeps working."""
    from kvtier.local_mooncake import MooncakeSegment

    holder = MooncakeSegment(master, 64 << 20)
    tier = tier_for(master, segment_bytes=0)  # a pure client: every chunk goes to the holder
    try:
        keys = make_keys(4)
        assert tier.put(keys, [make_payload(i) for i in range(4)]) == [True] * 4
        assert check_bytes(tier, keys, range(4)) == [True] * 4
        holder.kill()
        assert bounded(lambda: check_bytes(tier, keys, range(4)), 20) == [False] * 4
        deadline = time.monotonic() + 20  # the master drops the segment after client_ttl
        while any(tier.contains(keys)):
            assert time.monotonic() < deadline
            time.sleep(0.3)
        holder.start()  # a new holder: writes and reads work again
        deadline = time.monotonic() + 20
        while tier.put(keys[:1], [make_payload(9)]) != [True]:
            assert time.monotonic() < deadline
            time.sleep(0.3)
        assert check_bytes(tier, keys[:1], [9]) == [True]
    finally:
        tier.close()
        holder.stop()


def test_master_down_at_start_connects_later():
    require_mooncake()
    from kvtier.local_mooncake import MooncakeMaster
    from kvtier.tiers.mooncake import MooncakeTier

    m = MooncakeMaster(start=False)
    try:
        t0 = time.monotonic()
        tier = MooncakeTier(m.address, SMALL_LAYOUT, metadata_server=m.metadata_url, segment_bytes=64 << 20,
                            retry_after_s=0.3)
        assert time.monotonic() - t0 < 3  # the engine is not held up by a master that is not there
        (k,) = make_keys(1)
        assert tier.contains([k]) == [False]
        assert tier.put([k], [make_payload(1)]) == [False]
        m.start()
        assert tier.wait_connected(30)
        assert tier.put([k], [make_payload(1)]) == [True]
        assert check_bytes(tier, [k], [1]) == [True]
        tier.close()
    finally:
        m.stop()


def test_corrupt_value_is_a_miss(mooncake_master):
    tier = tier_for(mooncake_master, prefix="corrupt:")
    k1, k2 = make_keys(2)
    assert tier.put([k1, k2], [make_payload(1), make_payload(2)]) == [True, True]
    # Overwrite k1's value with k2's bytes (a valid header, but for another key), and flip a
    # payload byte of k2 (the checksum fails): both are misses, counted, never wrong bytes.
    raw = tier._store
    buf = np.zeros(2 * (HEADER_SIZE + N), dtype=np.uint8)
    ptr = buf.ctypes.data
    raw.register_buffer(ptr, buf.nbytes)
    assert raw.batch_get_into([tier._name(k2)], [ptr], [HEADER_SIZE + N]) == [HEADER_SIZE + N]
    buf[HEADER_SIZE + N:] = buf[:HEADER_SIZE + N]
    buf[HEADER_SIZE + N + HEADER_SIZE + 7] ^= 0xFF
    raw.batch_remove([tier._name(k1), tier._name(k2)], True)
    assert raw.batch_upsert_from([tier._name(k1), tier._name(k2)], [ptr, ptr + HEADER_SIZE + N],
                                 [HEADER_SIZE + N] * 2) == [0, 0]
    raw.unregister_buffer(ptr)
    assert check_bytes(tier, [k1, k2], [1, 2]) == [False, False]
    assert tier.stats().corrupt == 2
    tier.close()


def test_registered_pool_moves_without_per_call_registration(mooncake_master):
    """Slots of memory given to register_memory go straight to Mooncake: no registration per call
    (a foreign buffer is registered for its call, then unregistered)."""
    tier = tier_for(mooncake_master, prefix="reg:")
    pool = torch.zeros(4 * N, dtype=torch.uint8)
    tier.register_memory(pool)
    calls = []
    real = tier._store

    class Spy:
        def __getattr__(self, name):
            return getattr(real, name)

        def register_buffer(self, ptr, size):
            calls.append(("register", size))
            return real.register_buffer(ptr, size)

    tier._store = Spy()
    slots = [pool[i * N:(i + 1) * N].numpy() for i in range(4)]
    keys = make_keys(2)
    slots[0][:] = make_payload(1)
    slots[1][:] = make_payload(2)
    assert tier.put(keys, slots[:2]) == [True, True]
    assert tier.get_into(keys, slots[2:]) == [True, True]
    assert np.array_equal(slots[3], make_payload(2))
    assert calls == []
    assert check_bytes(tier, keys, [1, 2]) == [True, True]  # fresh arrays: registered per call
    assert calls == [("register", N), ("register", N)]
    tier._store = real
    tier.close()


@pytest.mark.parametrize("writer", ["threads", "process"])
def test_store_with_cpu_and_mooncake(mooncake_master, writer):
    """The store built from a config with tiers [cpu, mooncake]: saves flow down to mooncake (from
    a child process too: a pure client writing into the parent's segment); a chunk gone from cpu
    is found there and loaded back into a host slot."""
    from kvtier.store import Store

    config = KVTierConfig.from_dict({
        "tiers": ["cpu", "mooncake"], "cpu_bytes": 16 * N, "writer": writer,
        "mooncake_master": mooncake_master.address, "mooncake_metadata": mooncake_master.metadata_url,
        "mooncake_segment_bytes": "64MiB", "mooncake_prefix": f"store-{writer}:"})
    with Store(config, SMALL_LAYOUT, pin=False) as store:
        assert store.lower[0].wait_connected(10)
        assert (store._process is not None) == (writer == "process")
        keys = make_keys(8)
        for i, k in enumerate(keys):
            ref = store.allocate()
            ref.data.numpy()[:] = make_payload(i)
            store.commit(k, ref)
        assert store.flush(10)
        assert all(store.lower[0].contains(keys))
        store.cpu.delete(keys[4:])
        assert store.locate(keys) == ["cpu"] * 4 + ["mooncake"] * 4
        refs = store.get(keys)
        for i, ref in enumerate(refs):
            assert ref is not None and np.array_equal(ref.data.numpy(), make_payload(i))
            ref.release()
        assert store.lower[0].stats().hits == 4


@pytest.mark.parametrize("settings, message", [
    ({"tiers": ["cpu", "mooncake"]}, "mooncake_master=''"),
    ({"mooncake_master": "http://10.0.0.1:50051"}, "expected HOST:PORT"),
    ({"mooncake_master": "10.0.0.1"}, "expected HOST:PORT"),
    ({"mooncake_master": "10.0.0.1:99999"}, "expected HOST:PORT"),
    ({"mooncake_metadata": "10.0.0.1:8080"}, "http://HOST:PORT/metadata"),
    ({"mooncake_metadata": "http://10.0.0.1/metadata"}, "http://HOST:PORT/metadata"),
    ({"mooncake_protocol": "udp"}, "allowed: tcp, rdma"),
    ({"mooncake_rdma_devices": "mlx5_0"}, "only used with mooncake_protocol: rdma"),
    ({"mooncake_host": "10.0.0.2:1234"}, "no port"),
    ({"mooncake_segment_bytes": "lots"}, "byte size"),
    ({"mooncake_segment_bytes": -1}, "cannot be negative"),
    ({"tiers": ["cpu", "mooncake"], "mooncake_master": "h:1", "mooncake_buffer_bytes": "4KiB"}, "at least 1MiB"),
    ({"mooncake_prefix": ""}, "non-empty"),
])
def test_bad_settings_stop_start_up(settings, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        KVTierConfig.from_dict({"cpu_bytes": "1GiB", **settings})


def test_good_settings_from_env():
    c = KVTierConfig.from_sources(env={"KVTIER_TIERS": "cpu,mooncake", "KVTIER_CPU_BYTES": "1GiB",
                                       "KVTIER_MOONCAKE_MASTER": "10.0.0.1:50051",
                                       "KVTIER_MOONCAKE_SEGMENT_BYTES": "8GiB",
                                       "KVTIER_MOONCAKE_PROTOCOL": "rdma",
                                       "KVTIER_MOONCAKE_RDMA_DEVICES": "mlx5_0"})
    assert c.tiers == ("cpu", "mooncake")
    assert (c.mooncake_master, c.mooncake_segment_bytes, c.mooncake_protocol) == ("10.0.0.1:50051", 8 << 30, "rdma")


def test_inspect_lists_the_pool(mooncake_master):
    """`kvtier inspect --mooncake-master`: chunks per model, read from the pool's headers; a master
    that is not there is a one-line error."""
    from click.testing import CliRunner

    from kvtier.cli import main
    from kvtier.local_redis import free_port
    from kvtier.store import Store

    m = mooncake_master
    config = KVTierConfig.from_dict({
        "tiers": ["cpu", "mooncake"], "cpu_bytes": 16 * N, "writer": "threads", "mooncake_master": m.address,
        "mooncake_metadata": m.metadata_url, "mooncake_segment_bytes": "64MiB", "mooncake_prefix": "inspect:"})
    with Store(config, SMALL_LAYOUT, label="model-m", pin=False) as store:  # it holds the segment
        assert store.lower[0].wait_connected(10)
        for i, k in enumerate(make_keys(5)):
            assert store.put(k, make_payload(i))
        assert store.flush(10)
        r = CliRunner().invoke(main, ["inspect", "--mooncake-master", m.address, "--mooncake-metadata",
                                      m.metadata_url, "--mooncake-admin", m.admin_url, "--mooncake-prefix",
                                      "inspect:", "--json"])
        assert r.exit_code == 0, r.output
        (row,) = json.loads(r.output)
        assert (row["model"], row["chunks"], row["bytes"]) == ("model-m", 5, 5 * N)
    down = f"127.0.0.1:{free_port()}"
    r = CliRunner().invoke(main, ["inspect", "--mooncake-master", down])
    assert r.exit_code == 2 and "does not answer" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(main, ["inspect", "--mooncake-master", "http://x"])
    assert r.exit_code == 2 and "HOST:PORT" in r.output
