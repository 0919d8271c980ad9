"""What differs between the vLLM releases kvtier supports (0.24 to 0.32), in one place.

Everything else in :mod:`kvtier.vllm` uses the v1 connector API common to them.
"""

from __future__ import annotations

try:  # vLLM >= 0.32: connectors say which tier a prefix hit came from (cache-hit metrics)
    from vllm.v1.metrics.cache_hit_source import CacheHitSource

    HOST_HIT_SOURCE = CacheHitSource.HOST
except ImportError:  # vLLM 0.24: no per-source hit metrics
    HOST_HIT_SOURCE = None
