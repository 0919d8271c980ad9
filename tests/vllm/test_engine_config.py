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
        engines(tiny_model, ENGINE, {"chunk_size": 48}, multiprocess=True)
    log = open(sorted((tmp_path.parent).glob("engine-logs*/test_engine_config-*.log"))[-1]).read()
    assert "must be a multiple of the engine's block size (32)" in log


def test_sync_loads_refused_under_async_scheduling(tiny_model, engines):
    """load_mode=sync with async scheduling would let vLLM die on a failed load: refused at start."""
    with pytest.raises(EngineError) as e:
        engines(tiny_model, engine_kwargs(async_scheduling=True), {"load_mode": "sync"})
    assert e.value.type_name == "ConfigError", e.value
    assert "--no-async-scheduling" in e.value.message


def test_multiconnector_recomputes_lost_chunks(tiny_model, engines, tmp_path):
    """kvtier beside vLLM's example connector in a MultiConnector: a chunk lost between lookup
    and load is recomputed (the policy reaches the config vLLM's scheduler reads), never an error."""
    import random

    multi = {"kv_connector": "MultiConnector", "kv_role": "kv_both", "kv_connector_extra_config": {"connectors": [
        {"kv_connector": "KVTierConnector", "kv_connector_module_path": "kvtier.vllm", "kv_role": "kv_both",
         "kv_connector_extra_config": {"chunk_size": 64, "tiers": ["cpu"], "cpu_bytes": "64MiB"}},
        {"kv_connector": "ExampleConnector", "kv_role": "kv_both",
         "kv_connector_extra_config": {"shared_storage_path": str(tmp_path / "example")}},
    ]}}
    base = engines(tiny_model, ENGINE, None, wait=False)
    kv = engines(tiny_model, engine_kwargs(kv_transfer_config=multi), None, wait=False)
    base.wait_ready()
    kv.wait_ready()
    rnd = random.Random(3)
    prompt = [rnd.randrange(3, 1024) for _ in range(400)]
    want = base.generate([prompt], 8, reset=True)["outputs"]
    assert kv.generate([prompt], 8, reset=True)["outputs"] == want  # stores the chunks
    kv.call("fault", faults=["lose_chunks"], args={"index": 2, "times": 1})
    got = kv.generate([prompt], 8, reset=True)
    assert kv.stats()["counters"]["faults_injected"] == 1, "no chunk was lost: the test proved nothing"
    assert got["outputs"] == want, "the lost chunk failed the request instead of being recomputed"
    # The example connector's loads get blocks kvtier is not told of: saves are fenced by request.
    assert kv.stats()["fence_rule"] == "kept requests"


def test_connector_by_name_through_the_plugin(tiny_model, engines):
    """vLLM loads kvtier's `vllm.general_plugins` entry point: no kv_connector_module_path needed."""
    import random

    by_name = {"kv_connector": "KVTierConnector", "kv_role": "kv_both",
               "kv_connector_extra_config": {"chunk_size": 64, "tiers": ["cpu"], "cpu_bytes": "64MiB"}}
    kv = engines(tiny_model, engine_kwargs(kv_transfer_config=by_name), None)
    prompt = [random.Random(9).randrange(3, 1024) for _ in range(300)]
    first = kv.generate([prompt], 4, reset=True)
    again = kv.generate([prompt], 4, reset=True)
    assert again["outputs"] == first["outputs"]
    assert kv.stats()["fence_rule"] == "fresh blocks"  # the only connector: it sees every allocation
    assert again["cached"][0] >= 256, again["cached"]
