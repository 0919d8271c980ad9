"""kvtier's counters through vLLM's connector stats API (kvtier.vllm.stats), without an engine."""

from __future__ import annotations

import numpy as np
import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from kvtier.layout import ChunkLayout
from kvtier.tiers.disk import DiskTier
from kvtier.vllm.stats import KVTierPromMetrics, KVTierStats, Totals, worker_counters


def test_reports_carry_every_total_and_merge(tmp_path):
    layout = ChunkLayout(1, 16, 8, torch.float16)
    disk = DiskTier(tmp_path, 1 << 20, layout)
    keys = [bytes([i]) * 16 for i in range(3)]
    disk.put(keys, [np.full(layout.nbytes, i, np.uint8) for i in range(3)])
    dest = np.zeros(layout.nbytes, np.uint8)
    disk.get_into(keys[:1], [dest])
    worker = {"loaded_tokens": 512, "failed_chunks": 1}
    totals = Totals("worker")
    first = totals.take(worker_counters(worker, [disk]))
    assert first == {"totals": {totals.source: {
        "loaded_tokens": 512, "load_errors": 1, "disk.hits": 1, "disk.puts": 3,
        "disk.bytes_read": disk.file_bytes, "disk.bytes_written": 3 * disk.file_bytes}}}
    # Two destinations: the tier reads a batch's chunks in parallel, and two reads into one buffer
    # could each hash the other's bytes (a checksum mismatch: the file removed as corrupt).
    disk.get_into(keys[1:], [dest, np.zeros_like(dest)])
    second = totals.take(worker_counters(worker, [disk]))
    assert second == {"totals": {totals.source: {
        "loaded_tokens": 512, "load_errors": 1, "disk.hits": 3, "disk.puts": 3,
        "disk.bytes_read": 3 * disk.file_bytes, "disk.bytes_written": 3 * disk.file_bytes}}}
    assert totals.take(worker_counters(worker, [disk])) == second  # unchanged: carried again
    assert Totals("worker").take({"lookups": 0.0}) == {}  # nothing counted yet: no report
    other = Totals("worker")  # another rank's connector: its own source
    assert other.source != totals.source
    merged = KVTierStats(data=first).aggregate(KVTierStats(data=second)).aggregate(
        KVTierStats(data=other.take({"disk.hits": 2.0, "saved_chunks": 4.0})))
    assert merged.reduce()["disk.hits"] == 5 and merged.reduce()["saved_chunks"] == 4
    assert merged.reduce()["loaded_tokens"] == 512
    assert not merged.is_empty() and KVTierStats(data={}).is_empty()
    assert KVTierStats(data={"totals": {"s": {}}}).is_empty()
    lat = KVTierStats(data={"latency": [["disk", "get_into", 0.002]]}).aggregate(
        KVTierStats(data={"latency": [["disk", "get_into", 0.004]], **other.take({"disk.hits": 3.0})}))
    assert lat.data["latency"] == [["disk", "get_into", 0.002], ["disk", "get_into", 0.004]]
    assert lat.reduce() == {"disk.hits": 3, "tier_ops": 2, "tier_op_mean_ms": 3.0}


def _prom(labels: dict[int, list]):
    registry = CollectorRegistry()
    prom = KVTierPromMetrics(type("Cfg", (), {"kv_transfer_config": None})(),
                             {Counter: lambda **kw: Counter(registry=registry, **kw), Gauge: Gauge,
                              Histogram: lambda **kw: Histogram(registry=registry, **kw)},
                             ["model_name", "engine"], labels)
    return prom, registry.get_sample_value


def test_a_report_vllm_drops_loses_no_count():
    """vLLM 0.24's offline LLM drops the stats of a step without request outputs (the first step of a
    chunked prefill, where lookups and loads happen): the counters must still add up."""
    prom, value = _prom({0: ["m", "0"]})
    worker, scheduler = Totals("worker"), Totals("scheduler")
    reports = []
    loaded = lookups = 0
    for step in range(6):
        loaded += 256 * (step % 3)
        lookups += 1
        merged = KVTierStats(data=worker.take({"loaded_tokens": float(loaded)})).aggregate(
            KVTierStats(data=scheduler.take({"lookups": float(lookups)})))
        reports.append(merged.data)
    for i, data in enumerate(reports):
        if i not in (1, 4):  # dropped: steps 1 and 4 had loads and lookups
            prom.observe(data, engine_idx=0)
    labels = {"model_name": "m", "engine": "0"}
    assert value("vllm:kvtier_loaded_tokens_total", labels) == loaded
    assert value("vllm:kvtier_lookups_total", labels) == lookups
    prom.observe(reports[2], engine_idx=0)  # an old report seen again (late, or twice) adds nothing
    assert value("vllm:kvtier_loaded_tokens_total", labels) == loaded


def test_a_dropped_report_whose_counts_never_change_again_is_still_counted():
    """The GPU runs' case: a request's lookups and loads happen in a step without outputs (dropped by
    vLLM 0.24's LLM), and nothing changes after it; the next report must carry those totals."""
    prom, value = _prom({0: ["m", "0"]})
    worker, scheduler = Totals("worker"), Totals("scheduler")
    for step, (loaded, lookups) in enumerate([(0.0, 1.0), (256.0, 1.0), (256.0, 1.0)]):
        report = KVTierStats(data=worker.take({"loaded_tokens": loaded})).aggregate(
            KVTierStats(data=scheduler.take({"lookups": lookups})))
        if step != 1:  # the step that loaded had no outputs: its report is dropped
            prom.observe(report.data, engine_idx=0)
    labels = {"model_name": "m", "engine": "0"}
    assert value("vllm:kvtier_loaded_tokens_total", labels) == 256
    assert value("vllm:kvtier_lookups_total", labels) == 1


def test_store_latency_is_kept_for_vllm_only_when_asked(tmp_path):
    from kvtier.config import KVTierConfig
    from kvtier.store import Store

    layout = ChunkLayout(1, 16, 8, torch.float16)
    store = Store(KVTierConfig(tiers=("cpu",), cpu_bytes=64 * layout.nbytes), layout, pin=False)
    store.lookup([b"k" * 16])
    assert store.metrics.take_recent_latency() == []  # nobody asked: nothing piles up
    store.metrics.keep_recent_latency()
    store.lookup([b"k" * 16])
    store.get([b"k" * 16])
    got = store.metrics.take_recent_latency()
    assert {("cpu", "contains"), ("store", "lookup"), ("store", "get")} <= {(t, op) for t, op, _ in got}
    assert all(s >= 0 for *_, s in got)
    assert store.metrics.take_recent_latency() == []
    store.close(10)


def test_prometheus_counters_per_engine_and_tier():
    prom, value = _prom({0: ["m", "0"], 1: ["m", "1"]})
    totals = Totals("worker")
    prom.observe(totals.take({"loaded_tokens": 256, "disk.hits": 1, "disk.bytes_read": 4096}), engine_idx=1)
    prom.observe({**totals.take({"loaded_tokens": 512, "disk.hits": 1, "disk.bytes_read": 4096}),
                  "latency": [["disk", "get_into", 0.003]]}, engine_idx=1)
    assert value("vllm:kvtier_loaded_tokens_total", {"model_name": "m", "engine": "1"}) == 512
    assert value("vllm:kvtier_tier_hits_total", {"model_name": "m", "engine": "1", "tier": "disk"}) == 1
    assert value("vllm:kvtier_tier_bytes_read_total", {"model_name": "m", "engine": "1", "tier": "disk"}) == 4096
    assert value("vllm:kvtier_loaded_tokens_total", {"model_name": "m", "engine": "0"}) is None
    hist = {"model_name": "m", "engine": "1", "tier": "disk", "op": "get_into"}
    assert value("vllm:kvtier_op_seconds_count", hist) == 1
    assert value("vllm:kvtier_op_seconds_bucket", {**hist, "le": "0.005"}) == 1


def test_step_host_time_per_step_and_side():
    """Issue 28.1: kvtier's hooks on the engine thread, summed per step, as a histogram per side."""
    import time as _time

    from kvtier.vllm.connector import _engine_thread
    from kvtier.vllm.stats import StepHostTime

    class Hooks:
        def __init__(self):
            self._host = StepHostTime("worker")

        @_engine_thread("before")
        def bind(self):
            pass

        @_engine_thread()
        def work(self, s):
            _time.sleep(s)

    h = Hooks()
    h.bind()
    h.work(0.002)
    h.work(0.003)
    h.bind()  # closes the step: one observation of both hooks together
    h.work(0.001)
    (step,) = h._host.take()
    assert step[0] == "worker" and 0.005 <= step[1] < 0.05
    assert h._host.take() == []
    prom, value = _prom({0: ["m", "0"]})
    total = KVTierStats(data={"step_host": [step]}).aggregate(KVTierStats(data={"step_host": [["scheduler", 2e-4]]}))
    prom.observe(total.data, engine_idx=0)
    labels = {"model_name": "m", "engine": "0"}
    assert value("vllm:kvtier_step_host_seconds_count", {**labels, "side": "worker"}) == 1
    assert value("vllm:kvtier_step_host_seconds_bucket", {**labels, "side": "scheduler", "le": "0.0003"}) == 1
    assert "step_host" not in total.reduce()


def test_benchmarks_read_the_step_host_histogram_they_recorded():
    """gpu_docs reads the histogram samples by the key phases.kvtier_metrics gives them."""
    import sys
    from pathlib import Path

    from kvtier.vllm.phases import metric_key, parse_metric_key

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from gpu_docs import step_host

    base = "vllm:kvtier_step_host_seconds"
    key = metric_key(f"{base}_bucket", {"side": "worker", "le": "0.0003"})
    assert key == f"{base}_bucket{{le=0.0003,side=worker}}"
    assert parse_metric_key(key) == (f"{base}_bucket", {"le": "0.0003", "side": "worker"})

    def snapshot(n: int, at_most_1ms: int, sum_s: float) -> dict:
        hist = {"0.0003": 0, "0.001": at_most_1ms, "0.005": n, "+Inf": n}
        out = {metric_key(f"{base}_bucket", {"side": "worker", "le": le}): float(c) for le, c in hist.items()}
        out[metric_key(f"{base}_count", {"side": "worker"})] = float(n)
        out[metric_key(f"{base}_sum", {"side": "worker"})] = sum_s
        out[metric_key(f"{base}_count", {"side": "scheduler"})] = 7.0
        return out

    got = step_host(snapshot(10, 10, 0.005), snapshot(110, 108, 0.105), "worker")
    assert got == {"steps": 100, "mean_s": 0.001, "p99_at_most_s": 0.005}
    got = step_host(snapshot(10, 10, 0.005), snapshot(110, 109, 0.105), "worker")
    assert got["p99_at_most_s"] == 0.001
    assert step_host(snapshot(10, 10, 0.005), snapshot(10, 10, 0.005), "worker") is None
