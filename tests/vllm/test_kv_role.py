"""vLLM's ``kv_role`` with kvtier (issue 27.1), on vLLM's real scheduler (no model runner).

``kv_producer`` (a prefill instance) saves every chunk it computes and never loads: its lookups
answer 0 even when the store holds the prompt. ``kv_consumer`` (a decode instance) loads every hit
and saves nothing unless ``consumer_saves``. ``kv_both`` does both.
"""

from __future__ import annotations

import pytest

from test_scheduler_direct import CHUNK, Harness, _prompt


def _run(tiny_model, role: str, extra: dict | None = None, stored_chunks: int = 1) -> Harness:
    """A 600-token prompt (2 full chunks) of which the store holds ``stored_chunks``, run to its end."""
    h = Harness(tiny_model, num_blocks=40, budget=256, kv_role=role, extra=extra, check_answers=role != "kv_producer")
    p = _prompt(5, 600)
    h.put_chunks(p, stored_chunks)
    h.add("A", p, max_tokens=3)
    h.run()
    return h


def test_producer_saves_and_never_loads(tiny_model):
    h = _run(tiny_model, "kv_producer")
    assert h.calls and all(answer == 0 for _, _, answer in h.calls), h.calls
    assert h.loads == []
    assert h.ledger.stats["save_chunks"] == 1  # chunk 1; chunk 0 is stored already
    assert h.ledger.stats["lookups"] == 0  # the store is not even asked


def test_consumer_loads_and_saves_nothing(tiny_model):
    h = _run(tiny_model, "kv_consumer", {"load_policy": "auto"})
    assert [(r, s, e) for _, r, s, e in h.loads] == [("A", 0, CHUNK)]
    assert h.ledger.stats["save_chunks"] == 0, "a decode instance saved the chunk it computed"
    # It never computes what it can load: every hit is claimed, whatever the cost model says.
    assert h.ledger.load_policy == "always"


def test_consumer_saves_when_asked(tiny_model):
    h = _run(tiny_model, "kv_consumer", {"consumer_saves": True})
    assert [(r, s, e) for _, r, s, e in h.loads] == [("A", 0, CHUNK)]
    assert h.ledger.stats["save_chunks"] == 1


@pytest.mark.parametrize("role", ["kv_both"])
def test_both_loads_and_saves(tiny_model, role):
    h = _run(tiny_model, role)
    assert [(r, s, e) for _, r, s, e in h.loads] == [("A", 0, CHUNK)]
    assert h.ledger.stats["save_chunks"] == 1


def test_failed_load_blocks_leave_the_prefix_cache(tiny_model):
    """vLLM registers a request's blocks in its prefix cache at allocation; a load failing in them
    takes them and the request's later blocks out of it (KVTierConnector._uncache), so a request
    preempted before it recomputed them cannot hand them to another (test_engine_tp.py: wrong
    tokens without it). Blocks before the failed one stay cached."""
    from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput

    h = Harness(tiny_model, num_blocks=40, budget=1024)
    p = _prompt(9, 600)
    h.put_chunks(p, 2)
    h.add("A", p, max_tokens=3)
    so = h.scheduler.schedule()
    assert [(ld.start, ld.end) for ld in so.kv_connector_metadata.loads] == [(0, 2 * CHUNK)]
    blocks = h.ledger.block_ids("A")
    pool = h.scheduler.kv_cache_manager.block_pool
    assert all(pool.blocks[b].block_hash is not None for b in blocks[:16]), "vLLM did not cache at allocation"
    out = ModelRunnerOutput(req_ids=["A"], req_id_to_index={"A": 0}, sampled_token_ids=[[]],
                            kv_connector_output=KVConnectorOutput(invalid_block_ids={blocks[5]}))
    h.scheduler.update_from_output(so, out)
    assert [pool.blocks[b].block_hash is None for b in blocks] == [False] * 5 + [True] * (len(blocks) - 5)
    assert h.scheduler.requests["A"].num_computed_tokens == 5 * 32  # vLLM recomputes from the failed block
