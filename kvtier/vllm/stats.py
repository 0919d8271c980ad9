"""kvtier's counters in vLLM's own metrics: its periodic "KV Transfer metrics" log line and its
Prometheus ``/metrics`` (``vllm:kvtier_*``), through the connector stats API (vLLM 0.24-0.33).

Each connector reports what changed since its last report, every step: the scheduler's one its
lookups and the prompt tokens it took from kvtier, the worker's one its loads, saves, load errors and
each tier's counters of that process (hits, misses, puts, evictions, errors, corrupt chunks,
bytes read and written) and the latency of each tier operation since (``LATENCY``: a list of
``[tier, op, seconds]``). vLLM sums the reports of every worker and the scheduler, logs the sums
of each interval and passes each report to :class:`KVTierPromMetrics`, which adds it to counters
labelled by engine (and tier) and the latencies to a histogram labelled by tier and operation.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics, KVConnectorStats

from kvtier import trace

# Report key -> help text. Worker keys first, then the scheduler's; "<tier>.<field>" keys are per tier.
COUNTERS = {
    "loaded_tokens": "Prompt tokens kvtier loaded into the engine's KV cache",
    "load_errors": "Chunks kvtier could not load (the engine recomputed them)",
    "saved_chunks": "Chunks kvtier saved from the engine",
    "skipped_saves": "Chunks not saved (no host slot, or their request's load failed)",
    "lookups": "Prefix lookups the scheduler asked kvtier (a waiting request is asked about again)",
    "hit_tokens": "Prompt tokens the scheduler took from kvtier (admitted hits)",
    "dropped_writes": "Chunks that never reached the lower tiers (disk or Redis behind; by reason in kvtier's own metrics)",
    "promoted_chunks": "Chunks copied up to the cpu tier in the background (hits not worth loading from below)",
    "fetch_seconds": "Seconds the worker spent reading loaded chunks from the tiers into host memory",
    "step_seconds": "Seconds the engine's forwards took, as kvtier timed them (the compute side of its cost model)",
    "step_tokens": "Tokens those forwards computed",
    "cost_skipped_tokens": "Prompt tokens kvtier held but did not load: computing them was expected to be faster",
    "predicted_load_seconds": "Load time the scheduler predicted for the hits it took (kvtier.costs)",
    "predicted_saved_seconds": "Compute time the scheduler predicted those hits save (kvtier.costs)",
}
LATENCY = "latency"  # report key of the latency observations
STEP_HOST = "step_host"  # report key of the per-step host time on the engine thread: [[side, seconds], ...]
STEP_HOST_BUCKETS = (1e-5, 5e-5, 1e-4, 2e-4, 3e-4, 5e-4, 1e-3, 2e-3, 5e-3, 0.01, 0.05, 0.1)
LATENCY_BUCKETS = (1e-5, 1e-4, 5e-4, 1e-3, 5e-3, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0)
TIER_COUNTERS = {
    "hits": "Chunks a tier found", "misses": "Chunks a tier did not find", "puts": "Chunks stored in a tier",
    "evictions": "Chunks a tier evicted", "errors": "Failed tier operations", "corrupt": "Corrupt chunks dropped",
    "bytes_read": "Bytes read from a tier", "bytes_written": "Bytes written to a tier",
}


def worker_counters(worker_stats: dict[str, int], tiers, store_counts: dict[str, float] | None = None) -> dict[str, float]:
    """The worker's cumulative counters: its loads and saves, and each tier of its store."""
    out = {"loaded_tokens": worker_stats.get("loaded_tokens", 0), "load_errors": worker_stats.get("failed_chunks", 0),
           "saved_chunks": worker_stats.get("saved_chunks", 0), "skipped_saves": worker_stats.get("skipped_saves", 0),
           "fetch_seconds": worker_stats.get("fetch_us", 0) / 1e6,
           "step_seconds": worker_stats.get("step_us", 0) / 1e6, "step_tokens": worker_stats.get("step_tokens", 0)}
    out.update(store_counts or {})
    for tier in tiers:
        s = tier.stats()
        for field in TIER_COUNTERS:
            out[f"{s.name}.{field}"] = getattr(s, field)
    return {k: float(v) for k, v in out.items()}


def scheduler_counters(ledger_stats: dict[str, int]) -> dict[str, float]:
    """The scheduler's cumulative counters (its :class:`~kvtier.vllm.scheduler.PrefixLedger`'s)."""
    return {"lookups": float(ledger_stats.get("queries", 0)), "hit_tokens": float(ledger_stats.get("load_tokens", 0)),
            "cost_skipped_tokens": float(ledger_stats.get("cost_skipped_tokens", 0)),
            "predicted_load_seconds": ledger_stats.get("predicted_load_us", 0) / 1e6,
            "predicted_saved_seconds": ledger_stats.get("predicted_saved_us", 0) / 1e6}


class Deltas:
    """What changed in cumulative counters since the last call."""

    def __init__(self) -> None:
        self._last: dict[str, float] = {}

    def take(self, now: dict[str, float]) -> dict[str, float]:
        changed = {k: v - self._last.get(k, 0.0) for k, v in now.items() if v != self._last.get(k, 0.0)}
        self._last = now
        return changed


@dataclass
class KVTierStats(KVConnectorStats):
    """Counter increments (``data``: name -> amount); reports add up."""

    def reset(self) -> None:
        self.data = {}

    def aggregate(self, other: KVConnectorStats) -> "KVTierStats":
        total = dict(self.data)
        for k, v in other.data.items():
            total[k] = total.get(k, [] if isinstance(v, list) else 0.0) + v
        return KVTierStats(data=total)

    def reduce(self) -> dict[str, int | float]:
        out = {k: int(v) if float(v).is_integer() else round(v, 3) for k, v in sorted(self.data.items())
               if not isinstance(v, list)}
        lat = self.data.get(LATENCY)
        if lat:  # the log line gets the count and mean of the interval's tier operations
            out["tier_ops"] = len(lat)
            out["tier_op_mean_ms"] = round(1e3 * sum(s for *_, s in lat) / len(lat), 3)
        return out

    def is_empty(self) -> bool:
        return not any(self.data.values())


class KVTierPromMetrics(KVConnectorPromMetrics):
    """``vllm:kvtier_<name>_total`` counters per engine, per tier for the tiers' counters."""

    def __init__(self, vllm_config: Any, metric_types: dict, labelnames: list[str],
                 per_engine_labelvalues: dict[int, list[object]]) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self._counters = {k: self._counter_cls(name=f"vllm:kvtier_{k}", documentation=doc, labelnames=labelnames)
                          for k, doc in COUNTERS.items()}
        self._tier_counters = {k: self._counter_cls(name=f"vllm:kvtier_tier_{k}", documentation=doc,
                                                    labelnames=[*labelnames, "tier"])
                               for k, doc in TIER_COUNTERS.items()}
        self._latency = self._histogram_cls(name="vllm:kvtier_op_seconds", documentation="Latency of kvtier's "
                                            "tier and store operations in the workers", buckets=list(LATENCY_BUCKETS),
                                            labelnames=[*labelnames, "tier", "op"])
        self._step_host = self._histogram_cls(
            name="vllm:kvtier_step_host_seconds", documentation="Host time kvtier's hooks took on the engine's "
            "thread per step (scheduler: lookups, allocations, planning; worker: loads, saves, reports)",
            buckets=list(STEP_HOST_BUCKETS), labelnames=[*labelnames, "side"])

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        labels = self.per_engine_labelvalues.get(engine_idx, [])
        for tier, op, seconds in transfer_stats_data.get(LATENCY, ()):
            self._latency.labels(*labels, tier, op).observe(seconds)
        for side, seconds in transfer_stats_data.get(STEP_HOST, ()):
            self._step_host.labels(*labels, side).observe(seconds)
        for key, amount in transfer_stats_data.items():
            if isinstance(amount, list) or amount <= 0:
                continue
            tier, _, field = key.rpartition(".")
            if tier and field in self._tier_counters:
                self._tier_counters[field].labels(*labels, tier).inc(amount)
            elif key in self._counters:
                self._counters[key].labels(*labels).inc(amount)


class StepHostTime:
    """Host time of kvtier's hooks on the engine's thread, summed per step (issue 28): every hook
    adds its own time; the step closes at a hook that marks its boundary."""

    def __init__(self, side: str, most: int = 4096) -> None:
        self.side = side
        self._trace_name = f"step_host.{side}"
        self._now = 0.0
        self._steps: list[float] = []
        self._most = most

    def add(self, seconds: float) -> None:
        self._now += seconds

    def close(self) -> None:
        if self._now > 0:
            if len(self._steps) < self._most:
                self._steps.append(self._now)
            trace.record(self._trace_name, time.perf_counter() - self._now, self._now)
        self._now = 0.0

    def take(self) -> list[list]:
        """[[side, seconds], ...] of the steps closed since the last call."""
        steps, self._steps = self._steps, []
        return [[self.side, s] for s in steps]
