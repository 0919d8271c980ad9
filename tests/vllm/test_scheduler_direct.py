"""vLLM's real v1 ``Scheduler`` driven directly, with kvtier's connector and fake model outputs.

Only the model runner is skipped: ``schedule()`` and ``update_from_output()`` are
vLLM's own, so every assertion vLLM makes about the connector's answers runs.

The preemption bug (known in another project): with chunked prefill, prefix caching
keeps more computed tokens (336) than the store holds (256); the request is
preempted and then asked about several times before blocks free up. A connector
that reuses an earlier answer claims tokens below what the engine already has, or
loads over them; vLLM's scheduler then trips an assertion or the KV is wrong.
"""

from __future__ import annotations

import pytest
import torch

from kvtier.costs import QUERY_TILE
from kvtier.vllm.scheduler import PrefixLedger

BLOCK = 32
CHUNK = 256


class Harness:
    def __init__(self, model: str, num_blocks: int, budget: int, chunk: int = CHUNK, max_model_len: int = 640,
                 reserve_full_isl: bool = True, check_answers: bool = True, kv_role: str = "kv_both",
                 extra: dict | None = None):
        from vllm.config import KVTransferConfig
        from vllm.engine.arg_utils import EngineArgs
        from vllm.utils.hashing import get_hash_fn_by_name
        from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
        from vllm.v1.core.sched.scheduler import Scheduler
        from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
        from vllm.v1.structured_output import StructuredOutputManager

        tc = KVTransferConfig(kv_connector="KVTierConnector", kv_connector_module_path="kvtier.vllm",
                              kv_role=kv_role,
                              kv_connector_extra_config={"chunk_size": chunk, "tiers": ["cpu"],
                                                         "cpu_bytes": "16MiB", "model": f"direct-{id(self)}",
                                                         **(extra or {})})
        args = EngineArgs(model=model, skip_tokenizer_init=True, enforce_eager=True, dtype="float32",
                          block_size=BLOCK, enable_prefix_caching=True, max_num_batched_tokens=budget,
                          max_model_len=max_model_len, num_gpu_blocks_override=num_blocks,
                          kv_transfer_config=tc, scheduler_reserve_full_isl=reserve_full_isl)
        vc = args.create_engine_config()
        vc.cache_config.num_gpu_blocks = num_blocks  # the engine core sets this after profiling
        spec = FullAttentionSpec(block_size=BLOCK, num_kv_heads=2, head_size=32, dtype=torch.float32)
        kvc = KVCacheConfig(num_blocks=num_blocks, kv_cache_tensors=[], kv_cache_groups=[
            KVCacheGroupSpec(["model.layers.0.self_attn.attn", "model.layers.1.self_attn.attn"], spec)])
        self.scheduler = Scheduler(vllm_config=vc, kv_cache_config=kvc,
                                   structured_output_manager=StructuredOutputManager(vc),
                                   block_size=BLOCK, log_stats=False)
        hash_fn = get_hash_fn_by_name(vc.cache_config.prefix_caching_hash_algo)
        init_none_hash(hash_fn)
        self.hasher = get_request_block_hasher(BLOCK, hash_fn)
        self.connector = self.scheduler.connector
        self.ledger: PrefixLedger = self.connector.ledger
        self.store = self.connector.store
        self.calls: list[tuple[str, int, int]] = []  # (req, num_computed_tokens, answer)
        self.loads = []
        self.preempted: list[tuple[str, int]] = []
        self.step_no = 0
        self.check_answers = check_answers
        # Blocks read by the saves of recent steps, which on a GPU may still be copying:
        # (request, blocks). Any of them handed to a request in a later step must be fenced.
        self.recent_saves: list[list[tuple[str, set[int]]]] = []
        self.fences = 0  # steps that reused a block of a recent save (and were fenced)
        self._wrap()

    def _wrap(self) -> None:
        conn, sched = self.connector, self.scheduler
        orig_match = conn.get_num_new_matched_tokens

        def match(request, num_computed_tokens):
            n, async_ = orig_match(request, num_computed_tokens)
            self.calls.append((request.request_id, num_computed_tokens, n))
            if not self.check_answers:
                return n, async_
            # The answer must follow from THIS call's count and the store, nothing older.
            keys = self.ledger.keys(request.all_token_ids)
            first = num_computed_tokens // CHUNK
            whole_blocks = (request.num_tokens - 1) // BLOCK * BLOCK
            hit = min((first + self.store.lookup(keys[first:])) * CHUNK, whole_blocks) \
                if first < len(keys) else 0
            assert n == max(0, hit - num_computed_tokens), (request.request_id, num_computed_tokens, n, hit)
            assert num_computed_tokens + n <= request.num_tokens - 1
            return n, async_

        conn.get_num_new_matched_tokens = match
        orig_preempt = sched._preempt_request

        def preempt(request, *a, **kw):
            self.preempted.append((request.request_id, request.num_computed_tokens))
            return orig_preempt(request, *a, **kw)

        sched._preempt_request = preempt

    def add(self, req_id: str, prompt: list[int], max_tokens: int) -> None:
        from vllm import SamplingParams
        from vllm.v1.request import Request

        sp = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        self.scheduler.add_request(Request(req_id, prompt, sp, None, block_hasher=self.hasher))

    def put_chunks(self, prompt: list[int], n_chunks: int) -> None:
        for key in self.ledger.keys(prompt, n_chunks):
            assert self.store.put(key, torch.zeros(self.store.layout.nbytes, dtype=torch.uint8))

    def step(self):
        """One scheduling step through vLLM's scheduler, checked; returns its SchedulerOutput."""
        from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput

        sched = self.scheduler
        before = {r.request_id: r.num_computed_tokens for r in sched.running}
        so = sched.schedule()
        self.step_no += 1
        meta = so.kv_connector_metadata
        for load in meta.loads:
            req = sched.requests[load.req_id]
            # The load ends at the engine's count and starts at the locally computed prefix.
            assert load.end == req.num_computed_tokens - so.num_scheduled_tokens[load.req_id]
            assert 0 <= load.start < load.end <= req.num_tokens - 1
            assert load.start % BLOCK == 0
            self.loads.append((self.step_no, load.req_id, load.start, load.end))
        # The ledger's block table is the engine's, after appends and resumptions alike.
        for req_id in so.num_scheduled_tokens:
            (engine_blocks,) = sched.kv_cache_manager.get_block_ids(req_id)
            assert self.ledger.block_ids(req_id) == list(engine_blocks), req_id
        for save in meta.saves:
            req = sched.requests[save.req_id]
            done = req.num_computed_tokens  # already advanced past this step
            assert all((ci + 1) * CHUNK <= done for ci in save.chunk_indices)
        self._check_save_fence(so)
        ids = list(so.num_scheduled_tokens)
        sampled = []
        for req_id in ids:
            req = sched.requests[req_id]
            sampled.append([7] if req.num_computed_tokens >= req.num_tokens else [])
        out = ModelRunnerOutput(req_ids=ids, req_id_to_index={r: i for i, r in enumerate(ids)},
                                sampled_token_ids=sampled, kv_connector_output=KVConnectorOutput())
        sched.update_from_output(so, out)
        del before
        return so

    def _check_save_fence(self, so) -> None:
        """A block that a recent step's save reads and that this step hands to a request (its
        KV is written by this step) belongs to a saving request the step does not keep, so
        the worker waits for that save before the step writes (KVWorker.fence_saves)."""
        meta = so.kv_connector_metadata
        # Blocks this step may write: a table's blocks from the first token not held already (a
        # prefix-cache hit's blocks are shared and only read; a kvtier load writes from its start).
        load_start = {ld.req_id: ld.start for ld in meta.loads}
        given: set[int] = set()
        for new in so.scheduled_new_reqs:
            given.update(new.block_ids[0][load_start.get(new.req_id, new.num_computed_tokens) // BLOCK:])
        cached = so.scheduled_cached_reqs
        for i, ids in enumerate(cached.new_block_ids):
            if ids is None:
                continue
            req_id = cached.req_ids[i]
            first = load_start.get(req_id, cached.num_computed_tokens[i]) if req_id in cached.resumed_req_ids else 0
            given.update(ids[0][first // BLOCK:])
        # One rule is sent: the fresh blocks where the connector sees every allocation, else the
        # requests kept (MultiConnector).
        assert (meta.fresh is None) != (meta.kept is None)
        if meta.fresh is not None:
            assert given <= meta.fresh, (self.step_no, sorted(given - meta.fresh))
        for step in self.recent_saves:
            for req_id, blocks in step:
                if not blocks.isdisjoint(given):
                    assert meta.kept is None or req_id not in meta.kept, (self.step_no, req_id, sorted(blocks & given))
                    self.fences += 1
        bs_per_chunk = CHUNK // BLOCK
        self.recent_saves.append([(s.req_id, {b for ci in s.chunk_indices
                                               for b in s.block_ids[ci * bs_per_chunk:(ci + 1) * bs_per_chunk]})
                                  for s in meta.saves])
        del self.recent_saves[:-8]

    def run(self, max_steps: int = 3000) -> None:
        while self.scheduler.has_requests() and self.step_no < max_steps:
            self.step()
        assert not self.scheduler.has_requests(), "requests did not finish"
        assert not self.ledger._chains, "per-request key chains outlived their requests"


def _prompt(seed: int, n: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 1000, (n,), generator=g).tolist()


def test_preemption_after_chunked_prefill_beyond_store(tiny_model):
    """336 computed by chunked prefill vs 256 in the store; preempted; asked again and again."""
    # 14 usable blocks: B holds 2, A's first step (256 loaded + 80 computed, B decoding 1 of the 81-token budget = 336) takes 11.
    # A's next chunk needs 2 more, finds 1, and A (the latest admitted) is preempted at 336.
    # While B decodes, A waits with 320 locally cached tokens (10 full blocks) and is asked
    # about at every step; B's growth evicts some of those blocks meanwhile.
    h = Harness(tiny_model, num_blocks=15, budget=81, reserve_full_isl=False)
    a = _prompt(1, 420)
    b = _prompt(2, 40)
    h.put_chunks(a, 1)                 # the store holds A's first chunk: 256 tokens
    h.add("B", b, max_tokens=60)       # admitted first
    h.step()
    h.add("A", a, max_tokens=4)
    h.run()
    a_calls = [(n, ans) for r, n, ans in h.calls if r == "A"]
    print("A calls (num_computed_tokens, answer):", a_calls)
    print("preempted:", h.preempted, "loads:", h.loads)
    assert a_calls[0] == (0, 256)                                   # first admission: load 256
    assert ("A", 336) in h.preempted, "A was not preempted at 336 computed tokens (256 stored)"
    after = a_calls[1:]
    assert len(after) >= 3, "A was not asked about several times after its preemption"
    # Whatever the local prefix cache kept, the answer is hit - computed of THAT call (asserted in match).
    assert any(n > 256 and ans == 0 for n, ans in after), "A was never asked with more local tokens than stored"


@pytest.mark.parametrize("bug, multi", [(None, False), (None, True), ("fresh_without_new_requests", False),
                                        ("keep_all", True)])
def test_saved_blocks_reused_only_behind_a_fence(tiny_model, bug, multi):
    """A finishes in the step that saves its last chunk; B, admitted next, needs A's freed
    blocks. The step that hands them to B lists them in ``fresh`` (where kvtier sees every
    allocation) or keeps A out of ``kept`` (``multi``: under MultiConnector), so the worker
    waits for A's save copies before B's KV is written there. A connector with its rule broken
    is caught."""
    h = Harness(tiny_model, num_blocks=20, budget=256, reserve_full_isl=False)
    h.connector._sees_all_allocations = not multi
    if bug:
        orig = h.connector.build_connector_meta

        def broken(so):
            meta = orig(so)
            if bug == "keep_all":
                meta.kept = frozenset(h.scheduler.requests) | {"A", "B"}
            else:
                meta.fresh = frozenset(b for ids in so.scheduled_cached_reqs.new_block_ids if ids for b in ids[0])
            return meta

        h.scheduler.connector.build_connector_meta = broken

    def run() -> None:
        h.add("A", _prompt(11, 520), max_tokens=1)
        while h.scheduler.has_requests():
            h.step()
        h.add("B", _prompt(12, 540), max_tokens=2)
        h.run()

    if bug:
        with pytest.raises(AssertionError, match="'A'" if bug == "keep_all" else r"^\(\d+, \["):
            run()
        return
    run()
    assert h.fences >= 1, "B was never given a block of A's save: the scenario does not test the fence"


def test_prefix_cache_hits_are_not_fenced(tiny_model):
    """B arrives while A runs, sharing A's first 512 tokens through vLLM's prefix cache. B's
    first step reads those blocks but does not write them: they are not in its ``fresh`` set,
    so B does not wait for A's saves of them (only the blocks B will write are)."""
    h = Harness(tiny_model, num_blocks=60, budget=256, reserve_full_isl=False)
    a = _prompt(21, 540)
    h.add("A", a, max_tokens=30)
    while h.step_no < 4:  # A's prefill (540 tokens, 256 a step), then decoding
        h.step()
    (a_blocks,) = h.scheduler.kv_cache_manager.get_block_ids("A")
    h.add("B", a[:512] + _prompt(22, 100), max_tokens=2)
    so = h.scheduler.schedule()
    new = [r for r in so.scheduled_new_reqs if r.req_id == "B"]
    assert new and new[0].num_computed_tokens == 512, "B did not hit A's blocks in vLLM's prefix cache"
    shared = set(a_blocks[:512 // BLOCK])
    assert set(new[0].block_ids[0][:512 // BLOCK]) == shared
    assert shared.isdisjoint(so.kv_connector_metadata.fresh)
    assert set(new[0].block_ids[0][512 // BLOCK:]) <= so.kv_connector_metadata.fresh


def test_buggy_ledger_is_caught(tiny_model):
    """A ledger that reuses its first answer (the known bug) crashes vLLM's own scheduler.

    The harness's answer check is off: what fails is vLLM's code, as in the known crash.
    """
    h = Harness(tiny_model, num_blocks=15, budget=81, reserve_full_isl=False, check_answers=False)
    first: dict[int, int] = {}
    orig = h.ledger.num_new_matched_tokens

    def stale(token_ids, num_computed_tokens, req_id=None):
        k = len(token_ids)
        if k not in first:
            first[k] = orig(token_ids, num_computed_tokens)
        return first[k]

    h.ledger.num_new_matched_tokens = stale
    a = _prompt(1, 420)
    h.put_chunks(a, 1)
    h.add("B", _prompt(2, 40), max_tokens=60)
    h.step()
    h.add("A", a, max_tokens=4)
    with pytest.raises(AssertionError) as e:
        h.run()
    assert "vllm" in str(e.traceback[-1].path), f"raised outside vLLM: {e.traceback[-1]}"
    assert any(r == "A" and n >= 256 and ans == 256 for r, n, ans in h.calls), "the stale answer was never given"


@pytest.mark.parametrize("seed", range(6))
def test_random_direct(tiny_model, seed):
    """Random shared prefixes, tight pool and budget: vLLM's scheduler never asserts."""
    import random

    rnd = random.Random(seed)
    num_blocks = rnd.choice([20, 22, 30])
    h = Harness(tiny_model, num_blocks=num_blocks, budget=rnd.choice([48, 80, 128]),
                reserve_full_isl=rnd.random() < 0.5)
    cap = (num_blocks - 2) * BLOCK  # every request must fit alone
    base = _prompt(100 + seed, 600)
    for i in range(3):
        h.put_chunks(base[: rnd.choice([256, 512])], rnd.choice([1, 2]) if i == 0 else 0)
    t = 0
    for i in range(8):
        n = rnd.randint(40, 560)
        p = base[: rnd.randint(0, n)]
        p = p + _prompt(1000 * seed + i, n - len(p))
        h.add(f"r{i}", p, max_tokens=max(1, min(rnd.randint(1, 60), cap - n)))
        for _ in range(rnd.randint(0, 6)):
            if h.scheduler.has_requests():
                h.step()
                t += 1
    h.run()
    print("seed", seed, "preempted", len(h.preempted), "loads", h.loads, "fences", h.fences)
    assert len(h.calls) >= 8 and h.step_no > 8  # every request was asked about and ran to its end


def test_decode_steps_plan_a_save_when_generated_tokens_fill_a_chunk(tiny_model):
    """Decode steps inside a chunk plan nothing (the connector does not even hand them to the
    ledger, issue 28); the step whose generated token completes a chunk plans its save, and the
    steps after plan nothing again."""
    h = Harness(tiny_model, num_blocks=64, budget=512)
    prompt = _prompt(5, CHUNK - 6)
    h.add("A", prompt, max_tokens=30)
    saves: list[tuple[int, list[int]]] = []
    while h.scheduler.has_requests():
        meta = h.step().kv_connector_metadata
        saves += [(h.step_no, s.chunk_indices) for s in meta.saves if s.req_id == "A"]
    # Step 1 computes the prompt (250 tokens, no full chunk); decode step k makes 250 + k tokens
    # computed by its end, and the chunk's 256th token is computed in the 7th step.
    assert saves == [(7, [0])], saves


def test_decode_steps_that_get_a_block_inside_a_chunk_keep_the_engines_block_table(tiny_model):
    """A decode step that gets a new block but completes no chunk plans nothing: the block goes
    straight onto the ledger's table (issue 28: every request of a decode batch gets one each
    BLOCK steps). The harness checks the ledger's table against vLLM's every step; the saves
    planned later read those blocks."""
    h = Harness(tiny_model, num_blocks=96, budget=1024)
    # Prompts ending 3, 2 and 1 blocks and a bit short of a chunk: their decodes cross block
    # boundaries at different steps, before and after the token that completes the chunk.
    lengths = {"A": CHUNK - 3 * BLOCK - 5, "B": CHUNK - 2 * BLOCK - 17, "C": CHUNK - BLOCK - 1}
    for i, (req_id, n) in enumerate(lengths.items()):
        h.add(req_id, _prompt(20 + i, n), max_tokens=CHUNK - n + 8)
    extended: list[str] = []
    extend = h.ledger.extend_blocks
    h.ledger.extend_blocks = lambda req_id, ids: (extended.append(req_id), extend(req_id, ids))[1]
    saves: dict[str, list] = {}
    while h.scheduler.has_requests():
        so = h.step()
        for s in so.kv_connector_metadata.saves:
            saves[s.req_id] = (s.chunk_indices, s.block_ids[:CHUNK // BLOCK])
            table = h.ledger.block_ids(s.req_id)
            assert s.block_ids == table, s.req_id
    # New blocks for tokens 160/192/224/256 (A), 192/224/256 (B), 224/256 (C): each in a step
    # that completes no chunk (token 256's is the first step of the next chunk).
    assert sorted(extended) == ["A"] * 4 + ["B"] * 3 + ["C"] * 2, extended
    assert sorted(saves) == ["A", "B", "C"] and all(idx == [0] for idx, _ in saves.values()), saves


def test_quiet_split_matches_a_plain_loop_over_random_steps():
    """The connector tells quiet requests apart in numpy (issue 28); the plain loop it replaced
    is the reference: same requests planned, same work counted, same blocks appended, over
    random steps with loads, resumptions, new blocks, unknown requests and chunk crossings."""
    import numpy as np

    from kvtier.vllm.connector import quiet_split

    rng = np.random.default_rng(7)
    for _ in range(300):
        n = int(rng.integers(0, 40))
        ids = [f"r{i}" for i in range(n)]
        computed = [int(x) for x in rng.integers(0, 4 * CHUNK, n)]
        new = rng.choice([1, 1, 1, 2, 40, 63, 64, 300], n).astype(np.int64)
        blocks = [None if rng.random() < 0.6 else ([int(rng.integers(0, 999))],) for _ in range(n)]
        planned = {r for r in ids if rng.random() < 0.1}
        known = {r for r in ids if rng.random() < 0.9}
        tables: dict[str, list[int]] = {r: [] for r in known}

        def extend(req_id, got, tables=tables):
            if req_id not in tables:
                return False
            tables[req_id].extend(got)
            return True

        loud, tokens, attention, context = quiet_split(ids, computed, new, blocks, CHUNK, planned, extend)
        want_loud, want_tokens, want_attention, want_context = [], 0, 0.0, 0
        want_tables: dict[str, list[int]] = {r: [] for r in known}
        for i, (r, cp, k, b) in enumerate(zip(ids, computed, new.tolist(), blocks)):
            if (cp + k) // CHUNK == cp // CHUNK and r not in planned and (b is None or r in known):
                if b is not None:
                    want_tables[r].extend(b[0])
                want_tokens += k
                if k >= QUERY_TILE:
                    want_attention += k * (cp + k / 2)
                else:
                    want_context += cp + k
            else:
                want_loud.append(i)
        assert (loud, tokens, context, tables) == (want_loud, want_tokens, want_context, want_tables)
        assert attention == pytest.approx(want_attention)


def test_decode_work_is_counted_as_context_and_prefill_work_as_attention():
    """kvtier.costs fits a decode's read of its context apart from a prefill's attention (on an H100
    a decode's costs ~80x more per token of context): both producers of a step's work, the ledger's
    on_step (the requests it plans) and quiet_split (the connector's quiet ones), count a decode's and
    a short tail's context, and a prefill's new tokens x their mean context."""
    import numpy as np

    from kvtier.keys import Namespace
    from kvtier.vllm.connector import quiet_split
    from kvtier.vllm.scheduler import ScheduledRequest

    # (computed, new), none completing a chunk: a decode, a tail just short of a tile, a prefill.
    work = {"decode": (4 * CHUNK + 10, 1), "tail": (2 * CHUNK + 20, QUERY_TILE - 1), "prefill": (5 * CHUNK, 200)}
    want = (1 + QUERY_TILE - 1 + 200, 200 * (5 * CHUNK + 100), (4 * CHUNK + 11) + (2 * CHUNK + 20 + QUERY_TILE - 1))
    ledger = PrefixLedger(None, Namespace("m", "float16", 2, 1, 64), CHUNK, BLOCK, saves=False)
    plan = ledger.on_step([ScheduledRequest(r, list(range(cp + n + 1)), cp, n, None, False)
                           for r, (cp, n) in work.items()])
    assert (plan.work_tokens, plan.work_attention, plan.work_context) == want
    computed, new = zip(*work.values())
    loud, *counted = quiet_split(list(work), computed, np.array(new), [None] * 3, CHUNK, set(), lambda *_: True)
    assert loud == [] and tuple(counted) == want
