"""kvtier's counters in vLLM's own metrics: its periodic "KV Transfer metrics" log line and its
Prometheus ``/metrics`` (``vllm:kvtier_*``), through the connector stats API (vLLM 0.24-0.33).

Each connector reports, in every step once a counter is above zero, the *totals* of its counters,
under its own source id (``TOTALS``: source -> name -> total): the scheduler's its lookups
and the prompt tokens it took from kvtier, the worker's its loads, saves, load errors and each tier's
counters of that process (hits, misses, puts, evictions, errors, corrupt chunks, bytes read and
written); beside them the latency of each tier operation since the last report (``LATENCY``: a list
of ``[tier, op, seconds]``) and the host time of each step (``STEP_HOST``). vLLM merges the reports
of every worker and the scheduler, logs them per interval and passes each to
:class:`KVTierPromMetrics`, which adds to its counters (labelled by engine, and tier) what a source's
totals grew by since it last saw them.

Every total in every report, because vLLM may drop a report: vLLM 0.24's offline ``LLM`` records
the stats of a step only when the step has request outputs, so the steps of a chunked prefill, where
the lookups and loads happen, are lost. A report of only what changed lost those counts for good
when nothing changed after them (the GPU runs' ``tokens_from_kvtier`` read 0); with every total in
every report, a dropped one costs nothing: the next carries the same totals. Latencies and step
times are samples; a dropped report loses its samples.
"""

from __future__ import annotations

import time
import itertools
import os
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
TOTALS = "totals"  # report key of the counters' totals: {source: {name: total}}
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


_SOURCES = itertools.count()


class Totals:
    """One connector's counters for vLLM's reports: all their totals, under a source id of its own
    (one per connector of one process)."""

    def __init__(self, side: str) -> None:
        self.source = f"{side}:{os.getpid()}:{next(_SOURCES)}"

    def take(self, now: dict[str, float]) -> dict[str, Any]:
        """``{TOTALS: {source: {name: total}}}`` of every counter above zero, changed or not (a
        dropped report must not lose a count); {} while every counter is zero."""
        above = {k: v for k, v in now.items() if v}
        return {TOTALS: {self.source: above}} if above else {}


def _merge_totals(a: dict[str, dict[str, float]], b: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Two reports' totals: per source and name the larger (totals only grow; the later report's)."""
    out = {source: dict(names) for source, names in a.items()}
    for source, names in b.items():
        mine = out.setdefault(source, {})
        for name, total in names.items():
            mine[name] = max(total, mine.get(name, total))
    return out


@dataclass
class KVTierStats(KVConnectorStats):
    """One report, or several merged: counters' totals per source, latency and step-time samples."""

    def reset(self) -> None:
        self.data = {}

    def aggregate(self, other: KVConnectorStats) -> "KVTierStats":
        total = dict(self.data)
        for k, v in other.data.items():
            if k == TOTALS:
                total[k] = _merge_totals(total.get(k, {}), v)
            elif isinstance(v, list):
                total[k] = total.get(k, []) + v
        return KVTierStats(data=total)

    def reduce(self) -> dict[str, int | float]:
        """The log line: each counter's total over the sources in these reports (since start-up),
        and the count and mean of the tier operations of the interval."""
        sums: dict[str, float] = {}
        for names in self.data.get(TOTALS, {}).values():
            for name, total in names.items():
                sums[name] = sums.get(name, 0.0) + total
        out = {k: int(v) if float(v).is_integer() else round(v, 3) for k, v in sorted(sums.items())}
        lat = self.data.get(LATENCY)
        if lat:
            out["tier_ops"] = len(lat)
            out["tier_op_mean_ms"] = round(1e3 * sum(s for *_, s in lat) / len(lat), 3)
        return out

    def is_empty(self) -> bool:
        return not (any(self.data.get(TOTALS, {}).values()) or self.data.get(LATENCY) or self.data.get(STEP_HOST))


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
        self._seen: dict[tuple[int, str], dict[str, float]] = {}  # (engine, source) -> totals counted

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        labels = self.per_engine_labelvalues.get(engine_idx, [])
        for tier, op, seconds in transfer_stats_data.get(LATENCY, ()):
            self._latency.labels(*labels, tier, op).observe(seconds)
        for side, seconds in transfer_stats_data.get(STEP_HOST, ()):
            self._step_host.labels(*labels, side).observe(seconds)
        for source, names in transfer_stats_data.get(TOTALS, {}).items():
            seen = self._seen.setdefault((engine_idx, source), {})
            for key, total in names.items():
                amount, seen[key] = total - seen.get(key, 0.0), max(total, seen.get(key, 0.0))
                if amount <= 0:
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
        trace.start_sampling()  # KVTIER_TRACE_SAMPLE_MS: what the engine's thread does in a late step
        self.side = side
        self._trace_name = f"step_host.{side}"
        self._now = 0.0
        self._steps: list[float] = []
        self._most = most

    def add(self, seconds: float) -> None:
        self._now += seconds

    def close(self) -> None:
        trace.mark_step()
        if self._now > 0:
            if len(self._steps) < self._most:
                self._steps.append(self._now)
            trace.record(self._trace_name, time.perf_counter() - self._now, self._now)
        self._now = 0.0

    def take(self) -> list[list]:
        """[[side, seconds], ...] of the steps closed since the last call."""
        steps, self._steps = self._steps, []
        return [[self.side, s] for s in steps]
