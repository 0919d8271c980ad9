"""Cost-aware loading (kvtier.costs): a hit is loaded only where reading beats computing.

The model's arithmetic on its own, then the scheduler's ledger over a real store whose disk
tier is made slow on purpose (real files, real reads, a sleep in each read): its chunks are
not claimed, they are promoted to the cpu tier in the background, and the next lookup claims
them from there. The CPU vLLM engine, whose prefill is slow, keeps loading from disk: the
engine tests (tests/vllm/) run with the default ``load_policy: auto`` and assert their loads.
"""

import time

import numpy as np
import pytest
import torch

from kvtier.config import ConfigError, KVTierConfig
from kvtier.costs import CostModel, _fit_steps
from kvtier.keys import Namespace
from kvtier.layout import ChunkLayout
from kvtier.store import Store
from kvtier.tiers.disk import DiskTier
from kvtier.vllm.scheduler import PrefixLedger, ScheduledRequest

CHUNK = 16
LAYOUT = ChunkLayout(2, CHUNK, 64, torch.float16)  # 8 KiB chunks
NS = Namespace("m", "float16", 2, 1, 64)


def model(token_s: float = 1e-4, **kw) -> CostModel:
    """A model whose compute is measured at ``token_s`` seconds per token (steps observed)."""
    m = CostModel(CHUNK, LAYOUT.nbytes, "cpu", **kw)
    for _ in range(8):
        m.observe_step(4 * CHUNK, 0.0, 4 * CHUNK * token_s)
        m.observe_step(CHUNK, 0.0, CHUNK * token_s)
    return m


def test_fit_recovers_step_costs():
    rng = np.random.default_rng(0)
    steps = []
    for _ in range(200):
        tokens = int(rng.integers(1, 4096))
        ctx = int(rng.integers(0, 32768))
        att = tokens * (ctx + tokens / 2)
        reads = float(rng.integers(0, 64 * 32768))  # the context of the step's decodes
        steps.append((tokens, att, reads, 0.004 + 2e-5 * tokens + 3e-10 * att + 4e-8 * reads))
    c, a, b, d = _fit_steps(steps, 256)
    assert c == pytest.approx(0.004, rel=1e-3) and a == pytest.approx(2e-5, rel=1e-3)
    assert b == pytest.approx(3e-10, rel=1e-3) and d == pytest.approx(4e-8, rel=1e-3)
    decode_only = [(8, 0.0, 8 * 1000.0, 0.01)] * 50  # no step computed a chunk: per-token cost unknown
    assert _fit_steps(decode_only, 256) is None
    big_decodes = [(512, 0.0, 512 * 1000.0, 0.03)] * 50  # a chunk of tokens, but no prefill among them
    assert _fit_steps(big_decodes, 256) is None


def test_decode_steps_do_not_inflate_the_prefill_estimate():
    """On an H100 (Llama-8B shape) a decode reads its whole context's KV for one query (~4e-8 s per
    token of context), a prefill computes a tile of queries per read (~1e-9 s per token-context pair):
    a window of mostly decode steps must not fit the prefill's attention cost from the decodes. Here
    8 steps prefill prompts of 2-4K tokens, then 240 decode steps of 32 requests whose contexts grow
    from 2K to 34K tokens, their work counted by the ledger's on_step; a 32K-token prefill must still
    be estimated near its true cost (before the decodes' context was a term of its own: 7.1 s for 1.22 s)."""
    m = CostModel(256, 256 * 131072, "cuda", max_step_tokens=8192)
    ledger = PrefixLedger(None, NS, CHUNK, CHUNK, saves=False)

    def step(computed: list[int], new: int, seconds: float) -> None:
        plan = ledger.on_step([ScheduledRequest(f"r{i}", range(cp + new + 1), cp, new, None, False)
                               for i, cp in enumerate(computed)])
        m.observe_step(plan.work_tokens, plan.work_attention, seconds, context=plan.work_context)

    for tokens in np.random.default_rng(3).integers(2048, 4097, 8).tolist():  # fresh prompts, from their start
        step([0], tokens, 0.007 + 2e-5 * tokens + 1e-9 * tokens * tokens / 2)
    for k in range(240):
        computed = [2048 + 136 * k + i for i in range(32)]  # one new token each: each reads its context
        step(computed, 1, 0.007 + 2e-5 * 32 + 4e-8 * sum(computed))
    true_s = 0.007 * 4 + 2e-5 * 32768 + 1e-9 * 32768**2 / 2  # as compute_s counts a 32K prefill's steps
    assert m.compute_s(0, 32768) == pytest.approx(true_s, rel=0.25), m.snapshot([])["fit"]


def test_decisions_follow_measured_speeds():
    m = model(token_s=1e-4)  # a chunk computes in 1.6 ms
    m.observe_read("disk", 4, 4 * 0.010)  # 10 ms a chunk: slower than computing it
    m.observe_read("redis", 4, 4 * 0.0001)  # 0.1 ms: faster
    n = 10 * CHUNK + 5
    assert m.chunks_to_load(0, ["disk"] * 8, n, n - 1)[0] == 0
    take, load_s, saved_s = m.chunks_to_load(0, ["redis"] * 8, n, n - 1)
    assert take == 8 and load_s < saved_s
    # cpu chunks first, then slow ones: the cpu part only
    assert m.chunks_to_load(0, ["cpu", "cpu", "cpu", "disk", "disk"], n, n - 1)[0] == 3
    # a disk slow only per read of the whole batch, but fast per chunk: loads
    m.observe_read("disk", 64, 64 * 0.0001)
    for _ in range(20):
        m.observe_read("disk", 64, 64 * 0.0001)
    assert m.chunks_to_load(0, ["disk"] * 8, n, n - 1)[0] == 8


def test_backlog_delays_a_tier():
    m = model(token_s=1e-4)
    m.observe_read("disk", 1, 0.0005)  # 0.5 ms a chunk: a win on its own (1.6 ms to compute)
    n = 9 * CHUNK
    assert m.chunks_to_load(0, ["disk"] * 8, n, n - 1)[0] == 8
    m.promise({"disk": 400})  # 0.2 s of reads promised to other requests
    assert m.chunks_to_load(0, ["disk"] * 8, n, n - 1)[0] == 0
    assert m.chunks_to_load(0, ["cpu"] * 8, n, n - 1)[0] == 8  # the cpu tier has no backlog


def test_observations_cross_processes():
    worker, sched = model(), CostModel(CHUNK, LAYOUT.nbytes, "cpu")
    worker.take_observations()
    worker.observe_read("disk", 2, 0.02)
    for _ in range(6):
        worker.observe_step(2 * CHUNK, 0.0, 0.5)
    sched.absorb(worker.take_observations())
    assert sched.read_s("disk") == pytest.approx(worker.read_s("disk"))
    assert sched.compute_s(0, 2 * CHUNK) == pytest.approx(0.5, rel=0.01)
    assert worker.take_observations() == []


def test_config_settings():
    assert KVTierConfig().load_policy == "auto"
    with pytest.raises(ConfigError, match="load_policy"):
        KVTierConfig(load_policy="sometimes")
    with pytest.raises(ConfigError, match="prefill_gbps"):
        KVTierConfig(prefill_gbps=-1)


class SlowDisk(DiskTier):
    """A real disk tier whose reads take ``delay`` seconds more per chunk: a slow device, so its files
    count as out of the page cache (``warm`` None) unless a test says otherwise (the real probe is
    tested in test_disk_tier.py)."""

    delay = 0.0
    warm: bool | None = None

    def get_into(self, keys, dests):
        time.sleep(self.delay * len(keys))
        return super().get_into(keys, dests)

    def page_cached(self, keys):
        return self.warm


def payload(i: int) -> np.ndarray:
    return np.random.default_rng(i).integers(0, 256, LAYOUT.nbytes, dtype=np.uint8)


@pytest.fixture
def slow_store(tmp_path):
    disk = SlowDisk(tmp_path / "disk", 1 << 30, LAYOUT)
    config = KVTierConfig(tiers=("cpu", "disk"), cpu_bytes=64 * LAYOUT.nbytes, disk_path=str(tmp_path / "disk"))
    store = Store(config, LAYOUT, pin=False, tiers=[disk])
    yield store, disk
    store.close()


def prompt_and_keys(ledger, chunks: int):
    tokens = list(range(1000, 1000 + chunks * CHUNK + 3))
    return tokens, ledger.keys(tokens)


def test_slow_disk_is_not_loaded_but_promoted(slow_store):
    store, disk = slow_store
    store.costs = model(token_s=1e-4)  # this "engine" computes a chunk in 1.6 ms
    ledger = PrefixLedger(store, NS, CHUNK, CHUNK, costs=store.costs, load_policy="auto")
    tokens, keys = prompt_and_keys(ledger, 6)
    for i, k in enumerate(keys):
        assert disk.put([k], [payload(i)]) == [True]  # on disk only
    disk.delay = 0.02  # 20 ms a chunk: measured by a real read below
    (ref,) = store.get([keys[5]])  # one read, timed by the store (and promoted: the cpu tier has it now)
    ref.release()
    assert store.costs.read_s("disk") > 0.015
    assert ledger.num_new_matched_tokens(tokens, 0, "r1") == 0  # found, not worth loading
    assert store.locate(keys) == ["disk"] * 5 + ["cpu"]
    ledger.on_alloc("r1", list(range(7)), 0)
    assert ledger.stats["cost_skipped_tokens"] == 6 * CHUNK
    plan = ledger.on_step([ScheduledRequest("r1", tokens, 0, len(tokens), None, False)])
    assert plan.promote == keys[:5]  # the worker copies them up in the background
    assert plan.work_tokens == len(tokens)
    disk.delay = 0.0
    store.promote_later(plan.promote)
    deadline = time.monotonic() + 10
    while store.pending_promotions() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert store.locate(keys) == ["cpu"] * 6
    assert store.metrics.value("kvtier_promoted_chunks_total") == 5
    # From the cpu tier it is a win: every whole block up to the last token is claimed.
    assert ledger.num_new_matched_tokens(tokens, 0, "r2") == 6 * CHUNK
    with store.get(keys[:1])[0] as ref:
        assert np.array_equal(ref.data.numpy(), payload(0))


def test_fast_disk_is_loaded_and_policy_always_loads_slow_one(slow_store):
    store, disk = slow_store
    store.costs = model(token_s=1e-3)  # a slow engine: 16 ms a chunk (a CPU engine's prefill)
    auto = PrefixLedger(store, NS, CHUNK, CHUNK, costs=store.costs, load_policy="auto")
    always = PrefixLedger(store, NS, CHUNK, CHUNK, costs=store.costs, load_policy="always")
    tokens, keys = prompt_and_keys(auto, 4)
    for i, k in enumerate(keys):
        disk.put([k], [payload(i)])
    refs = store.get(keys[3:])  # measured: a plain read of a small file, well under a millisecond
    for r in refs:
        r.release()
    assert auto.num_new_matched_tokens(tokens, 0, "a") == 4 * CHUNK
    store.costs.observe_read("disk", 1, 1.0)
    for _ in range(30):
        store.costs.observe_read("disk", 1, 1.0)  # now a second a chunk
    store.cpu.delete(keys)
    assert auto.num_new_matched_tokens(tokens, 0, "a") == 0
    assert always.num_new_matched_tokens(tokens, 0, "b") == 4 * CHUNK


def test_decision_uses_the_engines_count_of_each_call(slow_store):
    """Invariant 1 under the cost policy: after a preemption the engine's count moves and the
    answer is derived from it, never from an earlier call's decision."""
    store, disk = slow_store
    store.costs = model(token_s=1e-3)
    ledger = PrefixLedger(store, NS, CHUNK, CHUNK, costs=store.costs, load_policy="auto")
    tokens, keys = prompt_and_keys(ledger, 8)
    for i, k in enumerate(keys):
        store.put(k, payload(i))
    assert ledger.num_new_matched_tokens(tokens, 0, "r") == 8 * CHUNK
    assert ledger.num_new_matched_tokens(tokens, 3 * CHUNK + 5, "r") == 8 * CHUNK - (3 * CHUNK + 5)
    assert ledger.num_new_matched_tokens(tokens, 8 * CHUNK, "r") == 0


def test_chunk_still_being_written_is_located_and_served_from_its_slot(tmp_path):
    """Issue 25.4: a chunk whose write to disk holds its slot is a cpu-speed hit even after the cpu
    tier's index evicted it (a stopped disk writer keeps it queued)."""
    import threading

    gate = threading.Event()

    class StuckDisk(DiskTier):
        def put(self, keys, payloads):
            gate.wait(10)
            return super().put(keys, payloads)

    disk = StuckDisk(tmp_path / "d", 1 << 30, LAYOUT)
    config = KVTierConfig(tiers=("cpu", "disk"), cpu_bytes=8 * LAYOUT.nbytes, disk_path=str(tmp_path / "d"),
                          write_threads=1)
    store = Store(config, LAYOUT, pin=False, tiers=[disk])
    try:
        k = b"q" * 16
        assert store.put(k, payload(7))
        deadline = time.monotonic() + 5
        while not store.pinned_writes() and time.monotonic() < deadline:
            time.sleep(0.005)
        store.cpu.delete([k])  # out of the cpu index; its write still holds the slot
        assert not store.cpu.contains([k])[0]
        assert store.locate([k]) == ["cpu"]
        (ref,) = store.get([k])
        assert ref is not None and np.array_equal(ref.data.numpy(), payload(7))
        ref.release()
    finally:
        gate.set()
        store.close()


def test_a_load_too_small_to_pay_its_fixed_cost_is_not_made():
    m = model(token_s=2.7e-5)  # an H200 on Llama-8B: a 16-token chunk computes in 0.43 ms
    m.load_overhead_s = 0.015
    n = 40 * CHUNK
    assert m.chunks_to_load(0, ["cpu"], n, n - 1)[0] == 0  # saves 0.4 ms, costs 15 ms
    assert m.chunks_to_load(0, ["cpu"] * 39, n, n - 1)[0] == 39  # saves 17 ms


def _reference_chunks_to_load(m: CostModel, start, chunk_tiers, end, limit):
    """The decision written as a plain loop over the chunks (the first implementation)."""
    import math

    def compute(s0):
        c0, a, b = m._coefficients()
        return 0.0 if end <= s0 else (math.ceil((end - s0) / m.max_step_tokens) * c0 + a * (end - s0)
                                      + b * (end * end - s0 * s0) / 2)

    first, best, best_gain, best_load, best_saved = start // CHUNK, 0, 0.0, 0.0, 0.0
    load, wait, full = m.load_overhead_s, 0.0, compute(start)
    for i, tier in enumerate(chunk_tiers):
        stop = min((first + i + 1) * CHUNK, limit)
        if stop <= start:
            continue
        wait = max(wait, m.backlog_s(tier))
        load += m.read_s(tier)
        saved = full - compute(stop)
        if saved - (load + wait) >= best_gain:
            best, best_gain, best_load, best_saved = i + 1, saved - (load + wait), load + wait, saved
        if stop >= limit:
            break
    return best, best_load, best_saved


def test_vectorized_decision_equals_the_plain_loop():
    """Issue 28: the decision runs on every lookup, vectorized; it must decide as the loop does."""
    import random

    rnd = random.Random(4)
    for trial in range(300):
        m = model(token_s=rnd.choice([1e-5, 1e-4, 1e-3]))
        m.load_overhead_s = rnd.choice([0.0, 0.002, 0.015])
        m.max_step_tokens = rnd.choice([16, 64, 8192])
        m.observe_read("disk", 1, rnd.uniform(1e-5, 5e-3))
        m.observe_read("redis", 1, rnd.uniform(1e-5, 5e-2))
        if rnd.random() < 0.3:
            m.promise({"disk": rnd.randrange(1, 50)})
        hit = rnd.randrange(1, 20)
        start = rnd.randrange(0, 3 * CHUNK)
        tiers = [rnd.choice(["cpu", "disk", "redis"]) for _ in range(hit)]
        end = (start // CHUNK + hit) * CHUNK + rnd.randrange(1, 3 * CHUNK)
        limit = min((start // CHUNK + hit) * CHUNK, rnd.randrange(start + 1, end))
        got = m.chunks_to_load(start, tiers, end, limit)
        want = _reference_chunks_to_load(m, start, tiers, end, limit)
        assert got[0] == want[0], (trial, got, want)
        assert got[1] == pytest.approx(want[1], rel=1e-6, abs=1e-3) and got[2] == pytest.approx(want[2], rel=1e-6)


def test_parked_load_wait_is_measured_as_the_load_overhead(slow_store):
    """The fixed cost of a load is what parked loads were seen to wait beyond their reads: the
    ledger times each from its allocation to the engine hearing it finished, plus one step."""
    store, _ = slow_store
    store.costs = model(token_s=1e-4)  # the 4-chunk hit saves 6.4 ms of compute
    store.costs.load_overhead_s = 0.0
    ledger = PrefixLedger(store, NS, CHUNK, CHUNK, costs=store.costs, load_policy="auto")
    tokens, keys = prompt_and_keys(ledger, 4)
    for i, k in enumerate(keys):
        store.put(k, payload(i))
    loads = 0
    while ledger.num_new_matched_tokens(tokens, 0, f"r{loads}") == 4 * CHUNK:
        rid = f"r{loads}"
        ledger.on_alloc(rid, list(range(5)), 4 * CHUNK, parked=True)
        ledger.on_step([], [ScheduledRequest(rid, tokens, 4 * CHUNK, 0, None, False)])
        time.sleep(0.02)  # the load and its report: a round trip the model did not know of
        ledger.on_loads_finished([rid], step_s=0.005)
        ledger.on_step([ScheduledRequest(rid, tokens, 4 * CHUNK, 3, None, False)])
        ledger.on_finished(rid)
        loads += 1
        assert loads < 10, "the measured waits never outweighed the 6.4 ms the hit saves"
    # After a few such waits a hit saving 6.4 ms is no longer loaded.
    assert loads >= 2 and store.costs.load_overhead_s > 0.0064
    # A sync load (not parked: read inside the step that computes the rest) is not a sample.
    store.costs.load_overhead_s = 0.0
    assert ledger.num_new_matched_tokens(tokens, 0, "x") == 4 * CHUNK
    ledger.on_alloc("x", list(range(5)), 4 * CHUNK)
    ledger.on_step([ScheduledRequest("x", tokens, 0, 4 * CHUNK + 3, None, False)])
    time.sleep(0.02)
    ledger.on_loads_finished(["x"], step_s=0.005)
    assert store.costs.load_overhead_s == 0.0


def test_hits_admitted_behind_others_computing_in_the_same_round_are_loaded(slow_store):
    """On an H100, 32 requests whose 1K-token prompts the cpu tier held arrived together; each was
    weighed alone (its ~21 ms of compute against a load's 50-105 ms round trip) and all were computed,
    in four 8K-token steps of ~190 ms. A request computed behind others in its step waits for theirs:
    that time counts for loading it. Each round (one step's admissions) starts over."""
    store, _ = slow_store
    store.costs = model(token_s=1e-4)  # a 4-chunk hit computes in 6.4 ms
    store.costs.load_overhead_s = 0.01  # a load: 10 ms, more than computing one hit alone
    ledger = PrefixLedger(store, NS, CHUNK, CHUNK, costs=store.costs, load_policy="auto")
    tokens, keys = prompt_and_keys(ledger, 4)
    for i, k in enumerate(keys):
        store.put(k, payload(i))
    for rnd in range(2):
        got = []
        for n in range(4):
            rid = f"r{rnd}-{n}"
            got.append(ledger.num_new_matched_tokens(tokens, 0, rid))
            ledger.on_alloc(rid, list(range(5)), got[-1])
        # The first is computed (alone it is faster); behind its 67 tokens the others are loaded.
        assert got == [0] + [4 * CHUNK] * 3, got
        ledger.on_step([ScheduledRequest(f"r{rnd}-{n}", tokens, 0, len(tokens), None, False) for n in range(4)])
    # A request looked up but not allocated (no budget left) puts nothing ahead of the next one.
    assert ledger.num_new_matched_tokens(tokens, 0, "x") == 0
    assert ledger.num_new_matched_tokens(tokens, 0, "y") == 0


def test_waiting_for_budget_after_a_load_is_not_its_cost(slow_store):
    """A busy engine keeps a request whose load finished waiting for budget, as it would have
    without the load: that wait is not counted against loading."""
    store, _ = slow_store
    store.costs = model(token_s=1e-4)
    store.costs.load_overhead_s = 0.0
    ledger = PrefixLedger(store, NS, CHUNK, CHUNK, costs=store.costs, load_policy="auto")
    tokens, keys = prompt_and_keys(ledger, 4)
    for i, k in enumerate(keys):
        store.put(k, payload(i))
    for n in range(6):
        rid = f"r{n}"
        assert ledger.num_new_matched_tokens(tokens, 0, rid) == 4 * CHUNK
        ledger.on_alloc(rid, list(range(5)), 4 * CHUNK, parked=True)
        ledger.on_step([], [ScheduledRequest(rid, tokens, 4 * CHUNK, 0, None, False)])
        ledger.on_loads_finished([rid], step_s=0.0005)  # finished at once
        time.sleep(0.05)  # then waits for budget
        ledger.on_step([ScheduledRequest(rid, tokens, 4 * CHUNK, 3, None, False)])
        ledger.on_finished(rid)
    assert store.costs.load_overhead_s < 0.0064


def test_load_overhead_sample_is_bounded():
    m = model()
    m.load_overhead_s = 0.0
    m.observe_load_wait(50.0, 0.0)  # a stalled engine, not what a load costs
    assert m.load_overhead_s <= 0.25 * 1.0 + 1e-9
    m.observe_load_wait(0.001, 0.5)  # faster than predicted: no negative overhead
    assert m.load_overhead_s >= 0.0


def test_a_traced_lookup_records_what_its_decision_assumed(slow_store, monkeypatch):
    """KVTIER_TRACE: each cost decision is a ``sched.cost`` line with the read time per tier (seed or
    measured), the backlog and the compute fit, to set against what the load then took (on the H100 a
    cold-page-cache disk load took 2-8x the compute it replaced, and no trace said what was assumed)."""
    import json

    from kvtier import trace

    store, disk = slow_store
    store.costs = model(token_s=1e-4)
    ledger = PrefixLedger(store, NS, CHUNK, CHUNK, costs=store.costs, load_policy="auto")
    tokens, keys = prompt_and_keys(ledger, 6)
    for i, k in enumerate(keys):
        assert disk.put([k], [payload(i)]) == [True]
    monkeypatch.setattr(trace, "ON", True)
    monkeypatch.setattr(trace, "_lines", [])
    ledger.num_new_matched_tokens(tokens, 0, "r1")
    (line,) = [json.loads(s) for s in trace._lines if '"sched.cost"' in s]
    assert line["req"] == "r1" and line["found"] == 6 and line["computed"] == 0
    assert line["measured"] == [] and set(line["read_ms"]) == {"disk"}  # the disk's seed: never read yet
    assert line["fit"] is not None and line["take"] in range(7)
    disk.delay = 0.02
    (ref,) = store.get([keys[5]])  # a timed read: the disk's estimate is measured now
    ref.release()
    ledger.num_new_matched_tokens(tokens, 0, "r2")
    last = json.loads([s for s in trace._lines if '"sched.cost"' in s][-1])
    assert last["req"] == "r2" and "disk" in last["measured"] and last["read_ms"]["disk"] > 15


def test_page_cached_disk_chunks_are_timed_and_costed_apart_from_cold_ones(slow_store):
    """On the H100 the disk's estimate came from reads the page cache served; after the page cache was
    dropped, four 32K-token hits were loaded from the device at ~1.4 GB/s, 2-8x slower than computing
    them. Reads are now timed under ``disk`` or ``disk~cached`` by whether the page cache held the
    files, and a lookup costs a hit by the same probe: a fast cached read no longer makes a cold
    hit look cheap."""
    store, disk = slow_store
    store.costs = model(token_s=1e-4)  # a chunk computes in 1.6 ms
    ledger = PrefixLedger(store, NS, CHUNK, CHUNK, costs=store.costs, load_policy="auto")
    tokens, keys = prompt_and_keys(ledger, 6)
    for i, k in enumerate(keys):
        assert disk.put([k], [payload(i)]) == [True]
    disk.warm = True  # page-cached reads: fast
    for k in keys[:2]:
        (ref,) = store.get([k])
        ref.release()
        store.cpu.delete([k])  # back to the disk only
    assert store.costs.read_s("disk~cached") < 0.005
    assert "disk" not in store.costs.snapshot(["disk"])["measured"]  # a cached read says nothing of the device
    disk.warm = False
    disk.delay = 0.02  # cold: the device's speed, 20 ms a chunk
    (ref,) = store.get([keys[5]])
    ref.release()
    store.cpu.delete([keys[5]])
    assert store.costs.read_s("disk") > 0.015 and store.costs.read_s("disk~cached") < 0.005
    assert ledger.num_new_matched_tokens(tokens, 0, "cold") == 0  # cold: slower than computing
    disk.warm = True
    assert ledger.num_new_matched_tokens(tokens, 0, "warm") == 6 * CHUNK  # cached: a win
