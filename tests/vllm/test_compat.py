"""The vLLM-release differences (kvtier/vllm/compat.py) and the load-mode decision, each path."""

from __future__ import annotations

import importlib
import sys
from types import SimpleNamespace

import pytest

from kvtier.config import ConfigError, KVTierConfig


def test_hit_source_on_this_release():
    from vllm.v1.metrics.cache_hit_source import CacheHitSource

    from kvtier.vllm import compat
    from kvtier.vllm.connector import KVTierConnector

    assert compat.HOST_HIT_SOURCE is CacheHitSource.HOST
    assert KVTierConnector._cache_hit_source is CacheHitSource.HOST


def test_hit_source_missing_as_on_vllm_024(monkeypatch):
    from kvtier.vllm import compat

    monkeypatch.setitem(sys.modules, "vllm.v1.metrics.cache_hit_source", None)  # import fails
    try:
        assert importlib.reload(compat).HOST_HIT_SOURCE is None
    finally:
        monkeypatch.undo()
        importlib.reload(compat)
    assert compat.HOST_HIT_SOURCE is not None


def _engine(async_scheduling, batches=1):
    return SimpleNamespace(scheduler_config=SimpleNamespace(async_scheduling=async_scheduling),
                           max_concurrent_batches=batches)


@pytest.mark.parametrize("mode, engine, parked", [
    ("auto", _engine(True), True),
    ("auto", _engine(False), False),
    ("auto", _engine(None), False),
    ("auto", _engine(False, batches=2), True),  # pipeline parallel: several batches in flight
    ("async", _engine(False), True),
    ("sync", _engine(False), False),
])
def test_load_mode(mode, engine, parked):
    from kvtier.vllm.connector import parks_loads

    assert parks_loads(KVTierConfig(load_mode=mode), engine) is parked


def test_sync_loads_refused_with_async_scheduling():
    from kvtier.vllm.connector import parks_loads

    with pytest.raises(ConfigError, match="--no-async-scheduling"):
        parks_loads(KVTierConfig(load_mode="sync"), _engine(True))


def test_bad_load_mode():
    with pytest.raises(ConfigError, match="load_mode='fast': allowed: auto, sync, async"):
        KVTierConfig(load_mode="fast")
