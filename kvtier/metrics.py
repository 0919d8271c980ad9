"""Prometheus metrics of one store.

Each :class:`Metrics` has its own registry, so several stores in one process
(tests, two engines) never mix their counts; :func:`serve_http` exposes one.
Per-tier counts live in each tier's :class:`~kvtier.tiers.base.TierStats`
(the one source of truth) and are read at scrape time by :class:`TierCollector`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Sequence

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from kvtier.tiers.base import Tier

_LATENCY_BUCKETS = (1e-5, 5e-5, 1e-4, 5e-4, 1e-3, 5e-3, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0)

_TIER_COUNTERS = {
    "hits": "Chunks found by get", "misses": "Chunks not found by get", "puts": "Chunks stored",
    "evictions": "Chunks evicted", "errors": "Failed operations (backend down, full, ...)",
    "corrupt": "Chunks that failed validation and were dropped",
    "bytes_read": "Bytes read", "bytes_written": "Bytes written",
}


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.lookups = Counter("kvtier_lookups", "Prefix lookups", registry=r)
        self.hit_tokens = Counter("kvtier_lookup_hit_tokens", "Full-chunk tokens found by lookups", registry=r)
        self.miss_tokens = Counter("kvtier_lookup_miss_tokens", "Full-chunk tokens not found by lookups",
                                   registry=r)
        self.latency = Histogram("kvtier_op_seconds", "Latency of store operations", ["tier", "op"],
                                 buckets=_LATENCY_BUCKETS, registry=r)
        self.dropped_writes = Counter("kvtier_dropped_writes", "Write-behind chunks dropped (queue full)",
                                      registry=r)
        self.tier_exceptions = Counter("kvtier_tier_exceptions", "Exceptions a tier raised (a tier bug)",
                                       ["tier"], registry=r)
        self.tier_overruns = Counter("kvtier_tier_overruns", "Tier calls the store stopped waiting for "
                                     "(past the tier's deadline; misses until they return)", ["tier"], registry=r)
        self.load_errors = Counter("kvtier_load_errors", "Chunks an engine asked for that could not be loaded",
                                   registry=r)
        self.saved_chunks = Counter("kvtier_saved_chunks", "Chunks an engine saved", registry=r)
        self.promoted_chunks = Counter("kvtier_promoted_chunks", "Chunks copied up to the cpu tier in the "
                                       "background (hits not worth loading from a slower tier)", registry=r)
        # Latency observations kept for a reader that forwards them (vLLM's metrics), when it asks.
        self.recent_latency: deque[tuple[str, str, float]] | None = None
        self._latency_children: dict[tuple[str, str], object] = {}  # labels() of each (tier, op), once

    def observe_latency(self, tier: str, op: str, seconds: float) -> None:
        """One operation's latency: into the histogram, and into ``recent_latency`` when kept."""
        child = self._latency_children.get((tier, op))
        if child is None:  # labels() costs microseconds on every lookup and load: once per pair
            child = self._latency_children[(tier, op)] = self.latency.labels(tier, op)
        child.observe(seconds)
        if self.recent_latency is not None:
            self.recent_latency.append((tier, op, seconds))

    def keep_recent_latency(self, most: int = 8192) -> None:
        """Keep up to ``most`` latency observations until :meth:`take_recent_latency`."""
        if self.recent_latency is None:
            self.recent_latency = deque(maxlen=most)

    def take_recent_latency(self) -> list[tuple[str, str, float]]:
        """The observations kept since the last call."""
        out = []
        while self.recent_latency:
            out.append(self.recent_latency.popleft())
        return out

    def watch_tiers(self, tiers: Callable[[], Sequence[Tier]]) -> None:
        self.registry.register(TierCollector(tiers))

    def value(self, name: str, labels: dict[str, str] | None = None) -> float:
        """Current value of a sample, e.g. ``value("kvtier_tier_errors_total", {"tier": "redis"})``."""
        v = self.registry.get_sample_value(name, labels or {})
        return 0.0 if v is None else v


class TierCollector:
    """Reads every tier's stats when Prometheus scrapes."""

    def __init__(self, tiers: Callable[[], Sequence[Tier]]) -> None:
        self._tiers = tiers

    def collect(self) -> Iterable[Metric]:
        stats = [t.stats() for t in self._tiers()]
        for field, doc in _TIER_COUNTERS.items():
            fam = CounterMetricFamily(f"kvtier_tier_{field}", doc, labels=["tier"])
            for s in stats:
                fam.add_metric([s.name], getattr(s, field))
            yield fam
        for field, doc in (("chunks", "Chunks held"), ("bytes", "Bytes held"), ("capacity_bytes", "Capacity")):
            fam = GaugeMetricFamily(f"kvtier_tier_{field}", doc, labels=["tier"])
            for s in stats:
                fam.add_metric([s.name], getattr(s, field))
            yield fam


def serve_http(metrics: Metrics, port: int, addr: str = "127.0.0.1") -> None:
    """Expose ``metrics`` at http://addr:port/metrics from a daemon thread."""
    start_http_server(port, addr=addr, registry=metrics.registry)
