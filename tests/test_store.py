"""The store against a plain dict model, and its failure handling."""

import threading
import time

import numpy as np
import pytest
import torch
from conftest import bounded
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvtier.config import KVTierConfig
from kvtier.layout import ChunkLayout
from kvtier.memory import HostPool
from kvtier.store import Store
from kvtier.tiers.base import Tier, TierStats
from kvtier.tiers.cpu import CpuTier
from kvtier.tiers.disk import DiskTier

LAYOUT = ChunkLayout(2, 16, 8, torch.float16)  # 1 KiB chunks


def payload(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, LAYOUT.nbytes, dtype=np.uint8)


def key(i: int) -> bytes:
    return i.to_bytes(16, "little")


def make_store(cpu_chunks=4, lower: list[Tier] | None = None, **cfg) -> Store:
    config = KVTierConfig(cpu_bytes=cpu_chunks * LAYOUT.nbytes, tiers=("cpu",), **cfg)
    return Store(config, LAYOUT, pin=False, tiers=lower or [])


def lower_cpu(chunks: int) -> CpuTier:
    """A second in-memory tier standing in for a lower tier (real disk/redis run in their own tests)."""
    t = CpuTier(HostPool(LAYOUT.nbytes, chunks, pin=False))
    t.name = "lower"
    return t


def read(store: Store, k: bytes) -> np.ndarray | None:
    (ref,) = store.get([k])
    if ref is None:
        return None
    with ref:
        return ref.data.numpy().copy()


def test_put_get_lookup_roundtrip():
    with make_store() as s:
        for i in range(3):
            assert s.put(key(i), torch.from_numpy(payload(i)))
        assert s.lookup([key(0), key(1), key(2), key(9)]) == 3
        assert s.lookup([key(9), key(0)]) == 0
        assert np.array_equal(read(s, key(1)), payload(1))
        assert read(s, key(9)) is None
        assert s.contains([key(2), key(5)]) == [True, False]
        assert s.metrics.value("kvtier_lookup_hit_tokens_total") == 3 * LAYOUT.tokens


def test_write_behind_then_eviction_then_promotion():
    low = lower_cpu(16)
    with make_store(cpu_chunks=2, lower=[low]) as s:
        for i in range(5):
            assert s.put(key(i), payload(i))
            assert s.flush(5)  # a slot stays held until its write-behind is done
        assert s.cpu.contains([key(0)]) == [False]  # evicted from the 2-slot cpu tier
        assert s.lookup([key(i) for i in range(5)]) == 5  # but the lower tier has all
        assert np.array_equal(read(s, key(0)), payload(0))
        assert s.cpu.contains([key(0)]) == [True]  # promoted
        assert s.metrics.value("kvtier_tier_evictions_total", {"tier": "cpu"}) >= 3


def test_lookup_asks_lower_tier_only_for_what_cpu_lacks():
    calls = []

    class Recording(CpuTier):
        def contains(self, keys):
            calls.append(list(keys))
            return super().contains(keys)

    low = Recording(HostPool(LAYOUT.nbytes, 8, pin=False))
    low.put([key(2)], [payload(2)])
    with make_store(lower=[low]) as s:
        s.put(key(0), payload(0))
        s.put(key(1), payload(1))
        s.flush(5)
        calls.clear()
        assert s.lookup([key(0), key(1), key(2), key(3)]) == 3
        assert calls == [[key(2), key(3)]]


class Gated(CpuTier):
    """An in-memory lower tier whose puts wait until ``gate`` is set."""

    name = "gated"

    def __init__(self, chunks: int) -> None:
        super().__init__(HostPool(LAYOUT.nbytes, chunks, pin=False))
        self.gate = threading.Event()

    def put(self, keys, payloads):
        self.gate.wait(10)
        return super().put(keys, payloads)


def drops(s: Store, reason: str) -> float:
    return s.metrics.value("kvtier_dropped_writes_by_reason_total", {"reason": reason})


def test_a_full_write_queue_keeps_chunks_unwritten_without_blocking():
    low = Gated(32)
    with make_store(cpu_chunks=32, lower=[low], write_queue_depth=2, write_threads=1) as s:
        for i in range(8):
            assert s.put(key(i), payload(i))  # returns at once although the tier is stuck
        assert s.pinned_writes() == 2  # the queue's bound; the other 6 wait in cpu, pinning nothing
        assert s.pending_writes() == 8 and s.cpu.unwritten() == 6
        assert s.metrics.value("kvtier_dropped_writes_total") == 0
        low.gate.set()
        assert s.flush(5)
        assert low.contains([key(i) for i in range(8)]) == [True] * 8
        assert all(np.array_equal(read(s, key(i)), payload(i)) for i in range(8))
    assert s.pool.free_slots == s.pool.num_slots


def test_a_chunk_evicted_while_queued_is_still_found_and_a_real_loss_is_counted():
    """cpu tier of 4, queue of 2, lower tier stuck: chunks 0 and 1 are pinned by their writes,
    2 and 3 wait unwritten. Saving 4 evicts 0 and 1 from cpu's index (their slots stay with their
    writes, so they are still served) and then 2, which cannot be queued: lost, counted."""
    low = Gated(16)
    with make_store(cpu_chunks=4, lower=[low], write_queue_depth=2, write_threads=1) as s:
        for i in range(5):
            assert s.put(key(i), payload(i))
        assert s.cpu.contains([key(i) for i in range(5)]) == [False, False, False, True, True]
        for i in (0, 1):
            ref = s._held(key(i))
            assert ref is not None and np.array_equal(ref.data.numpy(), payload(i))
            ref.release()
        assert s._held(key(3)) is None  # not pinned: in the cpu tier, unwritten
        assert s.contains([key(i) for i in range(5)]) == [True, True, False, True, True]
        assert s.lookup([key(0), key(1)]) == 2 and s.locate([key(0)]) == ["cpu"]
        assert np.array_equal(read(s, key(0)), payload(0))  # get serves it from its write's slot
        assert drops(s, "evicted_unwritten") == 1 and s.metrics.value("kvtier_dropped_writes_total") == 1
        assert s.pinned_writes() == 2
        low.gate.set()
        assert s.flush(5)
        assert low.contains([key(i) for i in range(5)]) == [True, True, False, True, True]
        assert s._held(key(0)) is None
    assert s.pool.free_slots == s.pool.num_slots


def test_without_a_cpu_tier_a_full_queue_drops_with_its_reason():
    low = Gated(64)
    config = KVTierConfig(tiers=("disk",), write_threads=1, write_queue_depth=4)
    with Store(config, LAYOUT, pin=False, tiers=[low]) as s:
        for i in range(10):
            assert s.put(key(i), payload(i))
        assert s.pinned_writes() == 4
        assert drops(s, "no_cpu_tier_queue_full") == 6
        low.gate.set()
        assert s.flush(5)
        assert sum(low.contains([key(i) for i in range(10)])) == 4
    assert s.pool.free_slots == s.pool.num_slots


def test_cpu_tier_offers_unwritten_chunks_to_spill_before_evicting_them():
    spilled = []

    def spill(k, ref, targets):
        spilled.append((k, targets))
        if len(spilled) == 1:
            taken.append(ref)  # the first is kept (its slot stays in use), the second refused
            return True
        return False

    taken: list = []
    pool = HostPool(LAYOUT.nbytes, 2, pin=False)
    tier = CpuTier(pool, spill=spill)
    for i in range(2):
        ref = tier.alloc()
        tier.insert(key(i), ref)
        assert tier.mark_unwritten(key(i), ("t", i))
    assert tier.mark_unwritten(key(7), "t") is False  # not indexed
    assert tier.unwritten() == 2
    ref = tier.alloc()  # evicts 0 (kept by spill: no slot freed), then 1 (refused: freed)
    assert ref is not None and spilled == [(key(0), ("t", 0)), (key(1), ("t", 1))]
    assert tier.unwritten() == 0 and tier.take_unwritten() is None
    ref.release()
    taken[0].release()
    assert pool.free_slots == 2


def test_take_unwritten_hands_chunks_over_in_marking_order():
    tier = CpuTier(HostPool(LAYOUT.nbytes, 4, pin=False))
    for i in (2, 0, 1):
        ref = tier.alloc()
        tier.insert(key(i), ref)
        tier.mark_unwritten(key(i), i)
    tier.delete([key(0)])  # deleted on purpose: not written either
    got = []
    while (item := tier.take_unwritten()) is not None:
        k, ref, targets = item
        got.append((k, targets))
        ref.release()
    assert got == [(key(2), 2), (key(1), 1)]


def test_lease_keeps_chunks_from_eviction():
    with make_store(cpu_chunks=2) as s:
        s.put(key(0), payload(0))
        s.put(key(1), payload(1))
        lease = s.lease([key(0), key(1)])
        assert s.put(key(2), payload(2)) is False  # nothing evictable
        lease.release()
        assert s.put(key(2), payload(2)) is True
        assert s.lookup([key(2)]) == 1


def test_expired_lease_no_longer_protects():
    with make_store(cpu_chunks=1, lease_ttl_s=0.01) as s:
        s.put(key(0), payload(0))
        s.lease([key(0)])  # never released: a leak must not pin memory forever
        import time

        time.sleep(0.02)
        s.lease([])  # expiry is checked when leases are taken
        assert s.put(key(1), payload(1)) is True


class Broken(Tier):
    name = "broken"

    def contains(self, keys):
        raise ConnectionError("backend gone")

    get_into = put = delete = contains

    def stats(self):
        return TierStats("broken")


def test_a_raising_tier_is_a_miss_not_a_crash():
    with make_store(lower=[Broken()]) as s:
        assert s.lookup([key(0)]) == 0
        assert s.get([key(0)]) == [None]
        s.put(key(1), payload(1))
        s.flush(5)
        assert np.array_equal(read(s, key(1)), payload(1))
        assert s.metrics.value("kvtier_tier_exceptions_total", {"tier": "broken"}) >= 3
    assert s.pool.free_slots == s.pool.num_slots


def test_get_when_every_slot_is_held_returns_misses():
    low = lower_cpu(8)
    low.put([key(i) for i in range(4)], [payload(i) for i in range(4)])
    with make_store(cpu_chunks=2, lower=[low]) as s:
        refs = s.get([key(0), key(1), key(2), key(3)])
        assert [r is not None for r in refs] == [True, True, False, False]
        for r, i in zip(refs[:2], range(2)):
            assert np.array_equal(r.data.numpy(), payload(i))
            r.release()


ops = st.lists(
    st.one_of(
        st.tuples(st.just("put"), st.integers(0, 11), st.integers(0, 3)),
        st.tuples(st.just("get"), st.lists(st.integers(0, 11), max_size=4), st.just(0)),
        st.tuples(st.just("lookup"), st.lists(st.integers(0, 11), max_size=6), st.just(0)),
        st.tuples(st.just("delete"), st.integers(0, 11), st.just(0)),
        st.tuples(st.just("flush"), st.just(0), st.just(0)),
    ),
    max_size=40,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=ops, cpu_chunks=st.integers(1, 4), low_chunks=st.integers(1, 6), low_kind=st.sampled_from(["cpu", "disk"]))
def test_store_matches_dict_model(ops, cpu_chunks, low_chunks, low_kind, tmp_path_factory):
    """Whatever is returned equals the last value put under that key; unknown keys never hit.

    The lower tier is a second cpu tier or a real disk tier (files in a fresh directory).
    """
    if low_kind == "disk":
        from kvtier.tiers.disk import DATA_OFFSET, DiskTier

        low = DiskTier(tmp_path_factory.mktemp("low"), low_chunks * (DATA_OFFSET + LAYOUT.nbytes), LAYOUT)
    else:
        low = lower_cpu(low_chunks)
    model: dict[bytes, int] = {}
    with make_store(cpu_chunks=cpu_chunks, lower=[low]) as s:
        for op, a, version in ops:
            if op == "put":
                # A key's bytes never change in kvtier (same key = same tokens); the model keeps
                # one value per key, so a re-put carries the same payload.
                seed = model.setdefault(key(a), a * 10 + version)
                s.put(key(a), payload(seed))
            elif op == "get":
                refs = s.get([key(i) for i in a])
                for i, ref in zip(a, refs):
                    if ref is not None:
                        assert key(i) in model
                        assert np.array_equal(ref.data.numpy(), payload(model[key(i)]))
                        ref.release()
            elif op == "lookup":
                hit = s.lookup([key(i) for i in a])
                assert all(key(i) in model for i in a[:hit])
            elif op == "delete":
                for t in s.tiers:
                    t.delete([key(a)])
            else:
                assert s.flush(5)
    # every slot came back: no leaked references
    assert s.pool.free_slots == s.pool.num_slots


def test_cpu_tier_change_journal():
    """track_changes/take_changes: the net change of each key since the last take, in order."""
    store = make_store(cpu_chunks=2)
    try:
        cpu = store.cpu
        store.put(key(0), payload(0))
        assert cpu.take_changes() == ([], [])  # not tracking yet
        cpu.track_changes()
        assert cpu.take_changes() == ([key(0)], [])  # what the tier held when tracking began
        store.put(key(1), payload(1))
        store.put(key(2), payload(2))  # full: evicts key 0 (least recently used)
        cpu.delete([key(1)])
        store.put(key(1), payload(1))  # back again: net "indexed"
        added, removed = cpu.take_changes()
        assert sorted(added) == [key(1), key(2)] and removed == [key(0)]
        assert cpu.take_changes() == ([], [])
        cpu.close()
        assert sorted(cpu.take_changes()[1]) == [key(1), key(2)]
    finally:
        store.close()


def test_ledger_counts_chunks_a_worker_process_reported():
    """vLLM's multi-process engine: chunks in the worker's cpu tier count once reported, and stop
    counting once reported dropped; lookups and save planning both see them."""
    from kvtier.keys import Namespace
    from kvtier.vllm.scheduler import PrefixLedger

    store = make_store(cpu_chunks=4)
    try:
        ledger = PrefixLedger(store, Namespace("m", "float16", 2, 1, 8), 16, 16)
        tokens = list(range(100, 100 + 16 * 4 + 1))
        k = ledger.keys(tokens)
        store.put(k[1], payload(1))  # this process's store holds chunk 1 only
        assert ledger.num_new_matched_tokens(tokens, 0) == 0
        ledger.note_worker_chunks([k[0], k[2]], [])
        assert ledger.num_new_matched_tokens(tokens, 0) == 48  # chunks 0, 1 (here), 2 (worker)
        assert ledger._contains(k) == [True, True, True, False]
        ledger.note_worker_chunks([], [k[0]])  # the worker evicted chunk 0
        assert ledger.num_new_matched_tokens(tokens, 0) == 0
        assert ledger.num_new_matched_tokens(tokens, 16) == 32
    finally:
        store.close()


@pytest.mark.parametrize("size", [1, LAYOUT.nbytes - 1, LAYOUT.nbytes + 1])
def test_put_of_a_wrong_size_is_refused_before_taking_a_slot(size):
    """Issue 14.2: a wrong size leaked a slot per call (all puts then failed); 1 byte was spread over the chunk."""
    s = make_store(cpu_chunks=4)
    for _ in range(2 * s.pool.num_slots):
        with pytest.raises(ValueError, match=f"must be {LAYOUT.nbytes} bytes .*got {size}"):
            s.put(key(1), np.zeros(size, dtype=np.uint8))
    assert s.pool.free_slots == s.pool.num_slots
    assert s.put(key(2), payload(2))
    assert np.array_equal(read(s, key(2)), payload(2))


def test_write_behind_never_starves_the_cpu_tier(tmp_path):
    """Issue 14.1: with write_queue_depth >= the pool's slots and a lower tier slower than the
    puts, the queue pinned every slot: ~97 % of puts refused, gets missing right after a hit."""
    import time

    from kvtier.tiers.disk import DiskTier

    class SlowDisk(DiskTier):
        def put(self, keys, payloads):
            time.sleep(0.005 * len(keys))
            return super().put(keys, payloads)

    s = Store(KVTierConfig(cpu_bytes=32 * LAYOUT.nbytes, tiers=("cpu",), write_queue_depth=256), LAYOUT,
              pin=False, tiers=[SlowDisk(tmp_path, 1 << 30, LAYOUT)])
    refused = hit_then_miss = 0
    for i in range(400):
        refused += not s.put(key(i), payload(i))
        if s.lookup([key(i)]):
            (ref,) = s.get([key(i)])
            hit_then_miss += ref is None
            if ref is not None:
                ref.release()
    assert refused == 0 and hit_then_miss == 0, (refused, hit_then_miss)
    # 400 puts at once into 32 slots, the disk far behind: evicting unwritten chunks is the only way
    assert drops(s, "evicted_unwritten") > 0  # and each shows as a dropped write, with its reason
    assert s.metrics.value("kvtier_dropped_writes_total") == drops(s, "evicted_unwritten")
    assert s.queue_depth <= s.pool.num_slots // 2
    s.close(30)


class PacedDisk(DiskTier):
    """A real disk tier whose puts wait for permits: the test sets how far the disk lags behind."""

    def __init__(self, path, layout: ChunkLayout = LAYOUT) -> None:
        super().__init__(path, 1 << 30, layout)
        self.permits = threading.Semaphore(0)
        self.taken = 0
        self._taken_lock = threading.Lock()

    def put(self, keys, payloads):
        for _ in keys:
            self.permits.acquire()
            with self._taken_lock:
                self.taken += 1
        return super().put(keys, payloads)

    def let_write(self, n: int = 1, timeout: float = 10.0) -> None:
        """Let ``n`` more chunks be written; wait (up to ``timeout``) until writers have taken them."""
        with self._taken_lock:
            want = self.taken + n
        for _ in range(n):
            self.permits.release()
        deadline = time.monotonic() + timeout
        while self.taken < want and time.monotonic() < deadline:
            time.sleep(0.0005)


def test_a_disk_behind_the_puts_loses_nothing(tmp_path):
    """Issue 25.4: a working set of 4N chunks saved into an N-slot cpu tier while the disk stays 3N/4
    chunks behind (more than the N/2 writes that may pin slots) all reaches the disk. Before, the
    write queue (N/2) filled and every chunk past it was dropped."""
    n = 16
    disk = PacedDisk(tmp_path)
    s = Store(KVTierConfig(cpu_bytes=n * LAYOUT.nbytes, tiers=("cpu",), write_threads=2), LAYOUT, pin=False,
              tiers=[disk])
    keys = [key(i) for i in range(4 * n)]
    lag = 3 * n // 4
    for i, k in enumerate(keys):
        assert s.put(k, payload(i))
        assert s.pinned_writes() <= s.queue_depth
        if i >= lag:
            disk.let_write()
    disk.let_write(lag, timeout=0)
    assert s.flush(30)
    assert s.metrics.value("kvtier_dropped_writes_total") == 0
    assert disk.contains(keys) == [True] * len(keys)
    s.close()
    assert s.pool.free_slots == s.pool.num_slots


def test_the_store_and_its_writer_import_no_server_and_not_each_other_at_import():
    """The import graph has no cycle: the writer child builds tiers from kvtier.tiers and reads the
    layout's wire form from kvtier.layout, not from the store or kvtier.server."""
    import subprocess
    import sys

    code = ("import sys, kvtier.writer; assert 'kvtier.store' not in sys.modules, 'writer imports store'; "
            "import kvtier.store; bad = [m for m in sys.modules if m.startswith('kvtier.server')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


class HangingDisk(DiskTier):
    """A real disk tier whose reads and lookups can hang (as a Mooncake read from a holder whose
    host dropped off the network did: 47-60 s), with a deadline of 0.2 s. A hung read, once let go,
    writes 0xEE over its destinations: the late write the store must keep away from other chunks."""

    name = "hanging"

    def __init__(self, path) -> None:
        super().__init__(path, 1 << 30, LAYOUT)
        self.hang = threading.Event()
        self.let_go = threading.Event()
        self.calls = 0

    def deadline(self, op, nbytes):
        return 0.2

    def contains(self, keys):
        self.calls += 1
        if self.hang.is_set():
            self.let_go.wait(30)
        return super().contains(keys)

    def put(self, keys, payloads):
        if self.hang.is_set():
            self.let_go.wait(30)
        return super().put(keys, payloads)

    def get_into(self, keys, dests):
        self.calls += 1
        if not self.hang.is_set():
            return super().get_into(keys, dests)
        self.let_go.wait(30)
        for d in dests:
            d[:] = 0xEE
        return [False] * len(keys)


def test_a_hung_tier_call_is_a_miss_and_its_slots_stay_held_until_it_returns(tmp_path):
    low = HangingDisk(tmp_path)
    keys = [key(i) for i in range(4)]
    assert low.put(keys, [payload(i) for i in range(4)]) == [True] * 4
    s = make_store(cpu_chunks=8, lower=[low])
    low.hang.set()
    t0 = time.monotonic()
    assert bounded(lambda: s.get(keys[:2]), 5) == [None, None]
    assert 0.2 <= time.monotonic() - t0 < 2.0
    assert s.metrics.value("kvtier_tier_overruns_total", {"tier": "hanging"}) == 1
    assert s.pool.free_slots == s.pool.num_slots - 2  # the hung read's destinations

    calls = low.calls  # while it hangs, the tier is skipped: misses at once, no second hung call
    assert bounded(lambda: s.get(keys[2:]), 1) == [None, None]
    assert bounded(lambda: s.lookup(keys), 1) == 0
    assert low.calls == calls

    others = s.allocate_many(s.pool.num_slots)  # every slot the pool can give: never a held one
    assert len(others) == s.pool.num_slots - 2
    for i, ref in enumerate(others):
        ref.data.numpy()[:] = i
    low.let_go.set()  # the hung read returns and writes over its own (held) slots
    deadline = time.monotonic() + 5
    while s._deadlines.hung("hanging"):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert all((ref.data.numpy() == i).all() for i, ref in enumerate(others))
    for ref in others:
        ref.release()
    assert s.pool.free_slots == s.pool.num_slots

    low.hang.clear()  # the backend is back: hits again
    assert s.lookup(keys) == 4
    assert all(np.array_equal(read(s, k), payload(i)) for i, k in enumerate(keys))
    s.close(5)


def test_a_hung_lookup_is_bounded_by_the_deadline(tmp_path):
    low = HangingDisk(tmp_path)
    assert low.put([key(0)], [payload(0)]) == [True]
    s = make_store(cpu_chunks=4, lower=[low])
    low.hang.set()
    t0 = time.monotonic()
    assert bounded(lambda: s.lookup([key(0)]), 5) == 0
    assert time.monotonic() - t0 < 2.0
    assert s.metrics.value("kvtier_tier_overruns_total", {"tier": "hanging"}) == 1
    low.let_go.set()
    s.close(5)


def test_a_hung_write_behind_put_is_not_waited_for_and_keeps_its_slot(tmp_path):
    low = HangingDisk(tmp_path)
    s = make_store(cpu_chunks=4, lower=[low], write_threads=1)
    low.hang.set()
    assert s.put(key(0), payload(0))
    t0 = time.monotonic()
    assert s.flush(5)  # the write-behind gave up on the hung put after its deadline
    assert time.monotonic() - t0 < 2.0
    assert s.metrics.value("kvtier_tier_overruns_total", {"tier": "hanging"}) == 1
    (ref,) = s.cpu.acquire_many([key(0)])
    assert ref.pool.refcount(ref.slot) == 3  # the cpu tier's, this one, and the hung put's
    ref.release()
    low.let_go.set()
    deadline = time.monotonic() + 5
    while s._deadlines.hung("hanging"):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    s.close(5)


def test_lookups_skip_a_tier_whose_read_hangs(tmp_path):
    """A tier that bounds its own lookups (the mooncake tier: Mooncake's RPC timeout) but not its
    reads: while a read hangs, its reads are skipped, so lookups do not claim its chunks either
    (each such claim would be a load reported failed, then recomputed)."""
    class LookupsBounded(HangingDisk):
        def deadline(self, op, nbytes):
            return None if op == "contains" else 0.2

        def contains(self, keys):
            self.lookups = getattr(self, "lookups", 0) + 1
            return DiskTier.contains(self, keys)

    low = LookupsBounded(tmp_path)
    keys = [key(i) for i in range(3)]
    assert low.put(keys, [payload(i) for i in range(3)]) == [True] * 3
    s = make_store(cpu_chunks=8, lower=[low])
    assert s.lookup(keys) == 3 and low.lookups == 1
    low.hang.set()
    assert bounded(lambda: s.get(keys[:1]), 5) == [None]
    assert s.lookup(keys) == 0 and low.lookups == 1  # not asked while its read hangs
    low.let_go.set()
    deadline = time.monotonic() + 5
    while s._deadlines.hung("hanging"):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    low.hang.clear()
    assert s.lookup(keys) == 3 and low.lookups == 2
    s.close(5)
