"""The real CPU engine with ``tiers: [cpu, mooncake]`` (issue 26.2): chunks saved through the cpu
tier reach the Mooncake pool, chunks the small cpu tier lost come back from it, and the greedy
outputs equal vLLM alone token for token, also after the master is killed mid-run."""

from __future__ import annotations

import os
import random

import pytest
from conftest import engine_kwargs
from engine_proc import SUMMARY, same_as_vllm


def _master():
    try:
        from kvtier.tiers.mooncake import import_store

        import_store()
    except ImportError as e:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the Mooncake engine test, but {e}", pytrace=False)
        pytest.skip(str(e))
    from kvtier.local_mooncake import MooncakeMaster

    return MooncakeMaster()


@pytest.fixture(scope="module")
def setup(tiny_model, engines):
    master = _master()
    kvtier = {"chunk_size": 64, "tiers": ["cpu", "mooncake"], "cpu_bytes": "1MiB", "load_policy": "always",
              "mooncake_master": master.address, "mooncake_metadata": master.metadata_url,
              "mooncake_segment_bytes": "64MiB", "retry_after_s": 0.5}
    base, kv = engines.pair(tiny_model, engine_kwargs(), kvtier)
    yield master, base, kv
    master.stop()


def _tokens(rnd: random.Random, n: int) -> list[int]:
    return [rnd.randrange(3, 1024) for _ in range(n)]


def test_cpu_and_mooncake_equal_vllm_alone(setup):
    master, base, kv = setup
    rnd = random.Random(26)
    docs = [_tokens(rnd, rnd.randint(300, 500)) for _ in range(4)]  # more than the 1 MiB cpu tier holds
    same_as_vllm(base, kv, [d + _tokens(rnd, 20) for d in docs])  # saves: cpu, then mooncake
    kv.call("flush")
    before = kv.stats()["store"]
    assert before["mooncake_puts"] >= 16, before
    cached = 0
    for d in docs:  # one at a time: a request's chunks fit in the 16 host slots
        cached += sum(same_as_vllm(base, kv, [d + _tokens(rnd, 30)])["cached"])  # loads
    after = kv.stats()["store"]
    assert after["mooncake_hits"] > before["mooncake_hits"], "no chunk came back from mooncake"
    assert after["mooncake_corrupt"] == after["mooncake_errors"] == after["load_errors"] == 0, after
    assert cached >= 4 * 256
    SUMMARY["hit_tokens"] += cached


def test_master_killed_engine_keeps_serving(setup):
    """Master gone: mooncake answers misses at once, the engine recomputes, outputs stay right."""
    master, base, kv = setup
    rnd = random.Random(27)
    doc = _tokens(rnd, 400)
    master.kill()
    same_as_vllm(base, kv, [doc + _tokens(rnd, 10), doc[:200] + _tokens(rnd, 40)])
    same_as_vllm(base, kv, [doc + _tokens(rnd, 20)])  # again, with the breaker open
    st = kv.stats()["store"]
    assert st["mooncake_errors"] > 0
