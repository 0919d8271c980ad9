"""Tensor parallelism at the worker level, without an engine (issue 27.2).

Two kvtier connectors on the worker side play the two ranks of one TP=2 engine, each with its
own store and paged cache, driven through vLLM's hooks in two threads; their TP group is a
thread barrier. What is checked:

- chunk keys are per rank: a rank > 0 stores and loads under keys derived from the scheduler's
  (rank 0's) keys, never under rank 0's own;
- a load that fails on one rank only skips, on every rank, the step's saves that depend on it
  (the failed request's, and a request sharing its blocks), and no other save.
"""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import make_connector

from kvtier.keys import Namespace, chunk_keys, rank_keys
from kvtier.vllm.ranks import RankAgreement
from kvtier.vllm.scheduler import LoadSpec, SaveSpec, StepPlan

L, H, D, BS, NB, C = 2, 2, 32, 32, 48, 256
LAYERS = [f"model.layers.{i}.self_attn.attn" for i in range(L)]


class ThreadGroup:
    """A TP group of threads: the collectives RankAgreement needs, over a barrier."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.barrier = threading.Barrier(size, timeout=30)
        self.slots: list = [None] * size
        self.rank = threading.local()
        self.calls = {"any": 0, "gather": 0}

    def _exchange(self, obj: object) -> list:
        self.barrier.wait()
        self.slots[self.rank.r] = obj
        self.barrier.wait()
        out = list(self.slots)
        self.barrier.wait()
        return out

    def agreement(self) -> RankAgreement:
        def gather(obj: object) -> list:
            self.calls["gather"] += 1
            return self._exchange(obj)

        def any_rank(flag: bool) -> bool:
            self.calls["any"] += 1
            return any(self._exchange(flag))

        return RankAgreement(gather, any_rank)


def _connector(rank: int, tmp_tag: str):
    """A worker-side KVTierConnector for rank ``rank`` of a TP=2 engine, its cache registered."""
    # Each rank's own store: another model name (the connector's namespace is set below).
    conn = make_connector("worker", f"tp-unit-{tmp_tag}-rank{rank}", block_size=BS, chunk_size=C, num_blocks=NB,
                          layers=LAYERS, kv_heads=H, head_size=D)
    caches = {n: torch.randn(NB, H, BS, 2 * D) for n in LAYERS}  # vLLM 0.32's CPU layout
    conn.register_kv_caches(caches)
    # The rank's namespace; its TP group (conn._ranks) is the test's (vLLM's is not initialized here).
    conn.namespace = Namespace("tp-unit", "float32", L, H, D, tp_rank=rank, tp_size=2)
    return conn


def _step(conn, meta) -> set[int]:
    """One step through vLLM's hooks, layer by layer; returns the blocks reported failed."""
    conn.bind_connector_metadata(meta)
    conn.start_load_kv(None)
    for name in LAYERS:
        conn.wait_for_layer_load(name)
        conn.save_kv_layer(name, None, None)
    conn.wait_for_save()
    conn.clear_connector_metadata()
    return conn.get_block_ids_with_load_errors()


@pytest.mark.parametrize("agree", [True, False])
def test_a_load_lost_on_one_rank_skips_dependent_saves_on_every_rank(agree):
    from kvtier.vllm.connector import KVTierMetadata

    tag = f"{agree}-{threading.get_ident()}"
    conns = [_connector(r, tag) for r in range(2)]
    ns0 = conns[0].namespace
    a = list(range(5, 5 + 600))     # loads chunk 0, computes and saves chunk 1
    b = list(range(700, 700 + 300))  # unrelated: saves its chunk 0
    ka, kb = chunk_keys(ns0, a, C), chunk_keys(ns0, b, C)
    # Chunk 0 of `a` is stored for rank 1 only (rank 0's copy was lost between lookup and load).
    for conn in conns[1:]:
        k1 = rank_keys(conn.namespace, ka[:1])
        assert k1 != ka[:1]
        assert conn.store.put(k1[0], torch.randn(conn.store.layout.nbytes // 4).view(torch.uint8))
    blocks_a = list(range(0, 19))
    blocks_c = blocks_a[:8] + list(range(30, 38))  # shares a's first chunk through the prefix cache
    blocks_b = list(range(19, 29))
    plan = StepPlan(loads=[LoadSpec("a", 0, 256, 0, ka[:1], blocks_a)],
                    saves=[SaveSpec("a", [1], ka[1:2], blocks_a), SaveSpec("b", [0], kb[:1], blocks_b),
                           SaveSpec("c", [1], [ka[1][::-1]], blocks_c)])
    meta = KVTierMetadata(plan)
    group = ThreadGroup(2)
    if agree:
        for conn in conns:
            conn._ranks = group.agreement()
    failed: list = [None, None]
    errors: list = []

    def run(r: int) -> None:
        group.rank.r = r
        try:
            failed[r] = _step(conns[r], meta)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert failed[0] == set(blocks_a[:8]) and failed[1] == set()  # vLLM unions these over the ranks
    assert meta.loads[0].keys == ka[:1], "a rank rewrote the scheduler's own plan"
    for r, conn in enumerate(conns):
        mine = lambda keys: rank_keys(conn.namespace, keys)  # noqa: E731
        assert conn.store.contains(mine(kb[:1])) == [True], f"rank {r}: an unrelated save was skipped"
        if r:
            assert conn.store.contains(kb[:1]) == [False], "rank 1 saved under rank 0's key"
        got = conn.store.contains(mine([ka[1], ka[1][::-1]]))
        if r == 0 or agree:
            assert got == [False, False], f"rank {r} committed chunks computed on rank 0's lost load"
        else:
            assert got == [True, True]  # without the agreement rank 1 commits them: the bug
    if agree:
        assert group.calls == {"any": 2, "gather": 2}
    for conn in conns:
        conn.shutdown()


def test_agreement_exchanges_only_when_a_rank_failed():
    group = ThreadGroup(2)
    agreements = [group.agreement() for _ in range(2)]
    out: list = [None, None]

    def run(r: int, reqs: set, blocks: set) -> None:
        group.rank.r = r
        out[r] = agreements[r].union(reqs, blocks)

    for inputs in ([(set(), set()), (set(), set())], [({"x"}, {3, 4}), (set(), {9})]):
        threads = [threading.Thread(target=run, args=(r, *inputs[r])) for r in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        want = (set().union(*(i[0] for i in inputs)), set().union(*(i[1] for i in inputs)))
        assert out == [want, want]
    assert group.calls == {"any": 4, "gather": 2}  # the quiet step only asked whether anyone failed


def test_rank_keys_are_distinct_per_rank_and_rank0_unchanged():
    ns = [Namespace("m", "float32", L, H, D, tp_rank=r, tp_size=4) for r in range(4)]
    keys = chunk_keys(ns[0], list(range(1024)), C)
    per_rank = [rank_keys(n, keys) for n in ns]
    assert per_rank[0] == keys
    flat = [k for ks in per_rank for k in ks]
    assert len(set(flat)) == len(flat)
    assert rank_keys(ns[2], keys) == per_rank[2]  # deterministic
    assert all(len(k) == len(keys[0]) for k in flat)
