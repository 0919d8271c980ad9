"""The preemption bug through the real engine (in-process scheduler and worker).

Chunked prefill (81-token budget) on a 14-block pool: request A (420 tokens) loads
its first 256 tokens from kvtier, computes beyond them, is preempted while prefix
caching keeps more of its tokens (352) than the store holds (256), and is asked
about at every step until B's blocks free up. Outputs must equal the baseline's.
"""

from __future__ import annotations

import random

import pytest
from conftest import engine_kwargs
from engine_proc import SUMMARY

ENGINE = engine_kwargs(num_gpu_blocks_override=15, max_num_batched_tokens=81, max_model_len=448,
                       scheduler_reserve_full_isl=False)
# "always": the answers are checked against the stored prefix; the cost policy's own answers under
# preemption are tests/test_costs.py::test_decision_uses_the_engines_count_of_each_call.
KVTIER = {"chunk_size": 256, "tiers": ["cpu"], "cpu_bytes": "16MiB", "load_policy": "always"}


@pytest.fixture(scope="module")
def pair(tiny_model, engines):
    base, kv = engines.pair(tiny_model, ENGINE, KVTIER)
    return base, kv


def _run(pair, prompts, mts, reset):
    base, kv = pair
    base.send("generate", prompts=prompts, max_tokens=mts, reset=reset)
    got = kv.generate(prompts, mts, reset=reset)
    want = base.recv()
    assert got["outputs"] == want["outputs"]
    return got


def test_preempted_beyond_stored_prefix(pair):
    rnd = random.Random(7)
    a = [rnd.randrange(3, 1024) for _ in range(420)]
    b = [rnd.randrange(3, 1024) for _ in range(40)]
    _run(pair, [a], [4], reset=False)                # A's first chunk (256 tokens) is saved
    before = pair[1].stats()
    got = _run(pair, [b, a], [60, 4], reset=True)    # B first, then A: A loads 256, is preempted later
    after = pair[1].stats()
    pre = after["counters"]["preemptions"] - before["counters"]["preemptions"]
    loaded = after["worker"]["loaded_tokens"] - before["worker"]["loaded_tokens"]
    lookups = after["ledger"]["queries"] - before["ledger"]["queries"]
    print(f"\npreemptions={pre} loaded_tokens={loaded} lookups={lookups} cached={got['cached']}")
    SUMMARY["scenarios"] += 2
    SUMMARY["preemptions"] += pre
    SUMMARY["hit_tokens"] += loaded
    assert pre >= 1, "A was not preempted"
    assert loaded >= 256
    assert lookups >= 4, "A was not asked about several times while waiting"
    # The bug's shape: A preempted with more tokens computed than the store holds (256),
    # then asked about again; every answer followed from that call's count.
    ev = after["events"]
    at = [n for length, n in ev["preempted_at"] if length == len(a)]
    assert at and max(at) > 256, f"A was not preempted beyond the stored prefix: {ev['preempted_at']}"
    a_calls = [(n, ans) for length, n, ans in ev["matched"] if length == len(a)]
    later = a_calls[a_calls.index((0, 256)) + 1:] if (0, 256) in a_calls else []
    assert len(later) >= 2, f"A was not asked about again after its preemption: {a_calls}"
    for n, ans in later:
        assert ans == max(0, 256 - n), (n, ans)
