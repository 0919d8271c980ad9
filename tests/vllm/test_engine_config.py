"""A bad connector config stops the engine at start with kvtier's message."""

from __future__ import annotations

import pytest
from conftest import engine_kwargs
from engine_proc import EngineError

ENGINE = engine_kwargs()


@pytest.mark.parametrize("extra, message", [
    ({"chunk_size": 48}, "chunk_size=48: must be a multiple of the engine's block size (32); use e.g. chunk_size=96"),
    ({"tiers": ["cpu", "ssd"]}, "unknown tier 'ssd'"),
    ({"chunk_sise": 256}, "unknown kvtier setting 'chunk_sise'"),
])
def test_bad_config_fails_at_start(tiny_model, engines, extra, message):
    with pytest.raises(EngineError) as e:
        engines(tiny_model, ENGINE, extra)
    assert e.value.type_name == "ConfigError", e.value
    assert message in e.value.message


def test_bad_config_multiprocess_engine(tiny_model, engines, tmp_path):
    """vLLM's default multi-process engine: start fails, kvtier's message is in the log."""
    with pytest.raises(EngineError):
        p = engines(tiny_model, ENGINE, {"chunk_size": 48}, multiprocess=True)
    log = open(sorted((tmp_path.parent).glob("engine-logs*/test_engine_config-*.log"))[-1]).read()
    assert "must be a multiple of the engine's block size (32)" in log
