"""The fixed cost of a parked load, as the scheduler-side connector measures it (kvtier.costs).

Each parked load's wait is timed from its allocation to the engine's report that it finished,
plus one step. That step used to be the time since the engine's previous output: after the
engine sat idle (a pause between requests, common in serving) it was the idle time, capped at
1 s, and the first load after the pause added ~0.25 s to the load overhead estimate. Every later
8K-token hit then looked slower than computing it, was not loaded, and never measured again: on
the H100 (gpu_docs, `kvtier_default_settled`) pass 2 loaded its first document and none after.
"""

from __future__ import annotations

import time

import pytest
import torch
from conftest import make_connector

from kvtier.vllm.scheduler import ScheduledRequest

pytest.importorskip("vllm")

C = 16  # chunk = block size
NB = 64


@pytest.fixture
def scheduler_connector():
    conn = make_connector("scheduler", "overhead-unit", block_size=C, chunk_size=C, num_blocks=NB, layers=["l0"],
                          kv_heads=2, head_size=16)
    yield conn
    conn.shutdown()


def _parked_load(conn, rid: str, tokens: list[int], idle_s: float) -> None:
    """A hit of the whole prompt, parked, planned after ``idle_s`` of an idle engine, and reported
    finished with that step's output."""
    from vllm.v1.outputs import KVConnectorOutput

    ledger = conn.ledger
    hit = ledger.num_new_matched_tokens(tokens, 0, rid)
    assert hit == len(tokens) - len(tokens) % C
    time.sleep(idle_s)
    ledger.on_alloc(rid, list(range(len(tokens) // C + 1)), hit, parked=True)
    ledger.on_step([], [ScheduledRequest(rid, tokens, hit, 0, None, False)])
    conn.update_connector_output(KVConnectorOutput(finished_recving={rid}))
    ledger.on_finished(rid)


def test_idle_time_before_a_load_is_not_its_cost(scheduler_connector):
    from vllm.v1.outputs import KVConnectorOutput

    conn = scheduler_connector
    costs = conn.ledger.costs
    costs.load_overhead_s = 0.0
    for _ in range(8):  # an engine that computes a token in 1 ms: the 8-chunk hit saves 0.13 s
        costs.observe_step(4 * C, 0.0, 4 * C * 1e-3)
        costs.observe_step(C, 0.0, C * 1e-3)
    tokens = list(range(500, 500 + 8 * C + 3))
    for i, key in enumerate(conn.ledger.keys(tokens)):
        assert conn.store.put(key, torch.full((conn.layout.nbytes,), i, dtype=torch.uint8))
    conn.ledger.on_step([], [])  # a step, and its output: then the engine sits idle
    conn.update_connector_output(KVConnectorOutput())
    _parked_load(conn, "after-idle", tokens, idle_s=0.6)
    assert costs.load_overhead_s < 0.02, "the idle time before the load was counted as its cost"
    # The engine busy: each step's time, planning to output, is the step that is counted.
    for n in range(3):
        _parked_load(conn, f"busy{n}", tokens, idle_s=0.0)
    assert costs.load_overhead_s < 0.02


def test_one_stalled_load_does_not_stop_the_next_ones():
    """A sample far above the estimate is more likely a stall than what loads cost: it moves the
    estimate a bounded step, and loads that keep waiting longer still raise it."""
    from kvtier.costs import CostModel

    m = CostModel(C, 8192, "cuda")
    base = m.load_overhead_s
    m.observe_load_wait(0.9, 0.0)
    assert m.load_overhead_s <= base + 0.02
    for _ in range(20):
        m.observe_load_wait(0.2, 0.0)  # loads that really wait 0.2 s
    assert m.load_overhead_s > 0.15


def test_a_step_is_timed_from_the_latest_planning(scheduler_connector):
    """vLLM reports no output for a step that ran no forward and moved no KV (a parked load's
    request waiting alone): the step whose output comes is the one planned last, not the oldest
    one still unreported, which may be long past."""
    ledger = scheduler_connector.ledger
    ledger.on_step([], [])
    time.sleep(0.2)
    ledger.on_step([], [])  # its output never comes
    time.sleep(0.01)
    assert 0.005 < ledger.on_step_done() < 0.1
