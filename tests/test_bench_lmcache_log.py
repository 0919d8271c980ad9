"""The GPU benchmarks' reading of LMCache's log and their check of hits against the host link (issue 30).

LMCache's own lines are the only record of what its retrieves moved; a "hit" timed below the link's
time for its bytes must be flagged, not tabled as a load (the H100 runs timed LMCache's 32K hits at
29 ms against a 78 ms link).
"""

from __future__ import annotations

import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

from gpu_lmcache.phase import summarize_log  # noqa: E402

# Lines in the formats of LMCache 0.5.3 (cache_engine.py, vllm_v1_adapter.py), among vLLM's.
LOG = """\
INFO 12-06 03:36:47 [core.py:100] engine started
[2026-12-06 03:36:50,001] LMCache INFO: Reqid: 1, Total tokens 32768, Inference Engine computed tokens: 0, \
LMCache hit tokens: 32767, need to load: 32767
[2026-12-06 03:36:50,031] LMCache INFO: [req_id=1] Retrieved 32767 out of 32767 required tokens (from 32767 \
total tokens). size: 4.0000 gb, cost 80.1250 ms, throughput: 49.9220 GB/s;
[2026-12-06 03:36:51,001] LMCache INFO: Reqid: 2, Total tokens 32768, Inference Engine computed tokens: 32752, \
LMCache hit tokens: 32767, need to load: 15
[2026-12-06 03:36:51,004] LMCache INFO: [req_id=2] Retrieved 256 out of 15 required tokens (from 32767 \
total tokens). size: 0.0312 gb, cost 1.5000 ms, throughput: 20.8333 GB/s;
"""


def test_retrieves_are_summed_and_kept_in_order():
    got = summarize_log(LOG)
    assert got["lookups"] == 2 and got["hit_tokens"] == 65534
    # The second "hit" was vLLM's own prefix cache (32,752 tokens) and 15 of LMCache's.
    assert [(e["vllm_computed"], e["need_to_load"]) for e in got["each_lookup"]] == [(0, 32767), (32752, 15)]
    r = got["retrieves"]
    assert r["count"] == 2
    assert r["retrieved_tokens"] == 32767 + 256 and r["required_tokens"] == 32767 + 15
    assert r["gb"] == 4.0312 and r["ms"] == 81.625
    assert [e["retrieved"] for e in r["each"]] == [32767, 256]
    assert got["degraded"] == []


def test_a_degraded_engine_is_reported_with_its_message():
    got = summarize_log(LOG + "LMCache ERROR: Failed to initialize LMCacheManager: no GPU\nTraceback ...\n")
    assert len(got["degraded"]) == 1 and "no GPU" in got["degraded"][0]


def test_hits_below_the_link_time_are_flagged_and_loads_above_it_are_not():
    from gpu_vllm import faster_than_link

    row = {"link_limit_s": 0.078, "kvtier_cpu_hit_s": 0.106, "native_offload_hit_s": 0.113,
           "lmcache_cpu_hit_s": 0.029, "kvtier_cpu_hit_cpu_only_s": None}
    assert faster_than_link(row) == ["lmcache_cpu_hit_s"]
    assert faster_than_link({**row, "link_limit_s": None}) == []


def test_outputs_that_differ_from_vllm_alone_are_named_with_where_they_diverge():
    from gpu_vllm import diverge_at

    outs = {"vllm": [5, 6, 7, 8], "kvtier_cpu": [5, 6, 7, 8], "native": [5, 6, 9, 8], "lmcache": [1, 6, 7, 8],
            "short": [5, 6], "skipped": None}
    assert diverge_at(outs) == {"native": 2, "lmcache": 0, "short": 2}
    assert diverge_at({"vllm": [1, 2], "kvtier_cpu": [1, 2]}) == {}


def test_a_hit_whose_first_token_differs_from_its_cold_run_is_flagged_per_prompt():
    from gpu_vllm import first_tokens_equal, lmcache_check

    cold = [{"op": "ttft", "s": 1.0, "cached": 0, "tokens": [t]} for t in (11, 12, 13)]
    hits = [{"op": "ttft", "s": 0.1, "cached": 2047, "tokens": [t]} for t in (11, 99, 13)]
    assert first_tokens_equal(cold, hits) == [True, False, True]
    assert first_tokens_equal(cold, []) is None
    warm_up = {"op": "ttft", "s": 0.5, "cached": 0, "tokens": [1]}
    run = {"steps": [warm_up, *cold, *hits], "settings": {"LMCACHE_LOCAL_CPU": "True"},
           "lmcache_log": {"retrieves": {"count": 0}}}
    got = lmcache_check(run, {2048: None}, 3)
    assert got["by_length"][2048]["first_token_equal"] == [True, False, True]
    assert got["by_length"][2048]["hit_s"] == 0.1 and got["retrieves"] == 0
    assert lmcache_check({"skipped": "no CUDA"}, {2048: None}, 3) == {"skipped": "no CUDA"}
