"""Scheduler side: which tokens to load and which chunks to save, per request and step.

Engine-agnostic: it sees request ids, token ids, block ids and the engine's
counts, never a vLLM object, so another engine's adapter can drive it the same way.

The rules (each is a test in tests/vllm/):

- **The engine's count is the truth.** :meth:`PrefixLedger.num_new_matched_tokens`
  derives its answer from the store's hit and the ``num_computed_tokens`` passed
  *in that call*, and remembers nothing of it. A later call (after a preemption,
  or when blocks were short and the engine asks again) computes afresh.
- :meth:`on_alloc` acts on the ``num_external_tokens`` the engine passes, not on
  what an earlier lookup answered; the load range is fixed only when the step is
  planned, from the engine's ``num_computed_tokens`` of that step:
  ``[num_computed_tokens - num_external_tokens, num_computed_tokens)``.
- Only whole blocks are claimed, and never the last token: the engine computes at least
  one (a claim ending inside a block gave wrong outputs on vLLM 0.32).
- Parked loads (vLLM's async-load path, used under async scheduling): the load range ends
  at the engine's count set at allocation, read when the step is planned; the request
  computes nothing until the load finished, so no step of it is in flight on a failed
  load. A request whose load failed answers 0 at its next lookups (it recomputes).
- Block ids are replaced, not appended, when a request is (re)admitted — a
  resumed request gets all-new blocks.
- **A hit must be a win** (``load_policy: auto``): of the chunks found, only the leading ones
  that are faster to read than to compute are claimed (:meth:`kvtier.costs.CostModel.chunks_to_load`);
  the rest are computed by the engine and copied up to the cpu tier in the background. The
  decision only shortens the answer of this call, so it cannot break the rules above.
- KV roles (prefill/decode disaggregation): a ledger that does not ``loads`` answers 0 to
  every lookup (a prefill instance computes every prompt and saves it); one that does not
  ``saves`` plans no save (a decode instance loads what the prefill instance saved).
- Saves: only full chunks whose every token is computed by the end of the step,
  and only those no tier holds yet (one batched ``contains``), each once per step.
- Chunks held in a worker process's cpu tier, which this process cannot see (vLLM's
  multi-process engine), count as stored once the worker reports them
  (:meth:`PrefixLedger.note_worker_chunks`); a report one step late can make a
  lookup claim an evicted chunk, whose load then fails and is recomputed.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field

from kvtier import trace
from kvtier.costs import QUERY_TILE, CostModel
from kvtier.keys import KeyChain, Namespace, chunk_keys

log = logging.getLogger(__name__)

_PROMOTE_MAX = 4096  # keys waiting for the next plan's promotions


@dataclass
class LoadSpec:
    """Load tokens ``[start, end)`` of a request from chunks ``first_chunk ...``.

    ``keys[i]`` is the key of chunk ``first_chunk + i``; token ``t`` goes to slot
    ``block_ids[t // block_size] * block_size + t % block_size``. Tokens below
    ``start`` are never written (their blocks may be shared). ``keys`` empty means the
    ledger could not plan the load: the worker reports the range as failed.
    """

    req_id: str
    start: int
    end: int
    first_chunk: int
    keys: list[bytes]
    block_ids: list[int]
    background: bool = False  # a parked load the worker runs off the engine's steps


@dataclass
class SaveSpec:
    """Save full chunks ``chunk_indices`` (keys ``keys``) of a request from its blocks."""

    req_id: str
    chunk_indices: list[int]
    keys: list[bytes]
    block_ids: list[int]


@dataclass
class StepPlan:
    loads: list[LoadSpec] = field(default_factory=list)  # read by this step's forward
    saves: list[SaveSpec] = field(default_factory=list)
    parked_loads: list[LoadSpec] = field(default_factory=list)  # requests waiting off the batch
    # What the engine computes in this step (kvtier.costs): new tokens; over requests of QUERY_TILE new
    # tokens or more, new tokens x their mean context; over the others (decodes), their context length.
    # The worker times the step against it.
    work_tokens: int = 0
    work_attention: float = 0.0
    work_context: float = 0.0
    promote: list[bytes] = field(default_factory=list)  # chunks to copy up to the cpu tier (background)


@dataclass(slots=True)
class ScheduledRequest:
    """One request scheduled in a step, as the engine reports it.

    ``num_computed_tokens`` is the engine's count at the start of the step (external
    tokens included); ``num_new_tokens`` the tokens it computes in this step (draft
    tokens excluded). ``block_ids`` are the new block ids (appended) or, with
    ``replace_blocks``, the request's whole block table.
    """

    req_id: str
    token_ids: Sequence[int]
    num_computed_tokens: int
    num_new_tokens: int
    block_ids: Sequence[int] | None
    replace_blocks: bool


@dataclass
class _Decision:
    """What a lookup decided for cost (kvtier.costs): tokens found but not claimed, the predicted
    load time of the claim and the compute time it saves, and the tiers of the claimed chunks."""

    skipped_tokens: int
    load_s: float
    saved_s: float
    tiers: list[str]


@dataclass
class _Req:
    block_ids: list[int] = field(default_factory=list)
    external: int = 0            # num_external_tokens of this step's allocation (0: no load)
    parked: bool = False         # the engine parks the request until its load finished
    load_failed: bool = False    # a load of it failed: its next lookups answer 0 (recompute)
    chunks_considered: int = 0   # leading full chunks already saved or found stored
    parked_at: float = 0.0       # when a parked load was allocated (0: none), for its measured wait
    parked_reads_s: float = 0.0  # that load's predicted reads, without the fixed overhead


class PrefixLedger:
    """Per-request bookkeeping of one engine's scheduler."""

    def __init__(self, store, namespace: Namespace, chunk_size: int, block_size: int,
                 hash_name: str = "blake3", costs: CostModel | None = None, load_policy: str = "always",
                 loads: bool = True, saves: bool = True) -> None:
        """``costs`` with ``load_policy="auto"``: claim only the chunks worth loading (module docstring).
        ``loads`` / ``saves`` False: every lookup answers 0 / no save is planned (the engine's KV
        role: a prefill instance only saves, a decode instance only loads)."""
        if chunk_size % block_size:
            raise ValueError(f"chunk_size {chunk_size} is not a multiple of block_size {block_size}")
        self.store = store
        self.namespace = namespace
        self.chunk_size = chunk_size
        self.block_size = block_size
        self.hash_name = hash_name
        self.reqs: dict[str, _Req] = {}
        # Requests allocated with external tokens since the last plan: a step's bookkeeping touches
        # these, not every request the engine holds (a decode step of 512 requests plans no load).
        self._allocated: dict[str, _Req] = {}
        self._step_leases: deque[list] = deque()  # per planned step not yet reported, oldest first
        self._planned_at = 0.0  # when the engine last planned a step (time.monotonic())
        self.worker_keys: set[bytes] = set()  # chunks in workers' cpu tiers (other processes)
        # Keys per request, hashed once: vLLM's request ids are unique for the engine's life and a
        # request's tokens only grow (KeyChain starts over if they do not continue what it hashed).
        self._chains: dict[str, KeyChain] = {}
        self.costs = costs
        self.load_policy = load_policy if costs is not None else "always"
        self.loads, self.saves = loads, saves
        # The latest lookup's cost decision per request, for counters and the tiers' backlog when the
        # engine allocates (never for the hit: every lookup decides afresh).
        self._decisions: dict[str, _Decision] = {}
        # Tokens the engine computes in this scheduling round for the requests allocated so far, and
        # per request looked up in it, what it computes if allocated as decided (chunks_to_load's
        # ``ahead``); both start over when the round's step is planned (on_step).
        self._round_tokens = 0
        self._to_compute: dict[str, int] = {}
        self._to_promote: dict[bytes, None] = {}  # keys for the next step's plan, in order
        # Counters for tests and logs.
        self.stats = {"queries": 0, "lookups": 0, "load_tokens": 0, "loads": 0,
                      "save_chunks": 0, "skipped_stored": 0, "cost_skipped_tokens": 0,
                      "predicted_load_us": 0, "predicted_saved_us": 0}

    def keys(self, token_ids: Sequence[int], max_chunks: int | None = None, req_id: str | None = None) -> list[bytes]:
        """Keys of the full chunks of ``token_ids``; with ``req_id``, from that request's chain."""
        if req_id is None:
            return chunk_keys(self.namespace, token_ids, self.chunk_size, self.hash_name, max_chunks)
        chain = self._chains.get(req_id)
        if chain is None:
            chain = self._chains[req_id] = KeyChain(self.namespace, self.chunk_size, self.hash_name)
        return chain.extend(token_ids, max_chunks)

    def note_worker_chunks(self, added: Sequence[bytes], removed: Sequence[bytes]) -> None:
        """A worker process reports chunks its cpu tier indexed and dropped since its last report."""
        self.worker_keys.difference_update(removed)
        self.worker_keys.update(added)

    def _locate(self, keys: Sequence[bytes]) -> list[str]:
        """Tier of each leading key some tier of this store or a worker's cpu tier holds."""
        locate = getattr(self.store, "locate", None)
        if locate is None:  # a `kvtier serve` store answers only how many
            return ["server"] * self.store.lookup(keys)
        if not self.worker_keys:
            return locate(keys)
        out: list[str] = []
        while len(out) < len(keys):
            if keys[len(out)] in self.worker_keys:
                out.append("cpu")
                continue
            found = locate(keys[len(out):])
            if not found:
                break
            out += found
        return out

    def _contains(self, keys: Sequence[bytes]) -> list[bool]:
        stored = self.store.contains(keys)
        return [s or k in self.worker_keys for k, s in zip(keys, stored)] if self.worker_keys else stored

    # ------------------------------------------------------------ lookups
    def num_new_matched_tokens(self, token_ids: Sequence[int], num_computed_tokens: int,
                               req_id: str | None = None) -> int:
        """Tokens beyond ``num_computed_tokens`` that the store can supply; no side effects on the
        store (the decision is kept for when the engine allocates).

        Only chunks from the one holding ``num_computed_tokens`` on are asked about:
        chunks below it are computed already, whether or not a tier still holds them.
        """
        got = self._matched(token_ids, num_computed_tokens, req_id)
        if req_id is not None:
            self._to_compute[req_id] = max(0, len(token_ids) - num_computed_tokens - got)
        return got

    def _matched(self, token_ids: Sequence[int], num_computed_tokens: int, req_id: str | None) -> int:
        self.stats["queries"] += 1
        n = len(token_ids)
        c = self.chunk_size
        if not self.loads or n // c == 0 or num_computed_tokens >= n - 1:
            return 0
        first = num_computed_tokens // c
        keys = self.keys(token_ids, req_id=req_id)
        if first >= len(keys):
            return 0
        tiers = self._locate(keys[first:])
        self.stats["lookups"] += 1
        # Whole blocks only, which also leaves the engine >= 1 token to compute. A claim that
        # ends inside a block (n - 1 for a prompt of whole chunks) gave wrong greedy outputs
        # on vLLM 0.32 (tests/vllm/test_engine_random.py::test_whole_chunk_prompts); vLLM's
        # own prefix cache and example connector stop at the last whole block too.
        limit = (n - 1) // self.block_size * self.block_size
        hit = min((first + len(tiers)) * c, limit)
        if hit <= num_computed_tokens or self.load_policy != "auto":
            return max(0, hit - num_computed_tokens)
        cost_tiers = getattr(self.store, "cost_tiers", None)  # a disk chunk in the page cache reads ~10x faster
        if cost_tiers is not None:
            tiers = cost_tiers(keys[first:first + len(tiers)], tiers)
        take, load_s, saved_s = self.costs.chunks_to_load(num_computed_tokens, tiers, n, limit, self._round_tokens)
        if trace.ON:  # what the decision assumed, to set against what the load or the compute then took
            trace.record("sched.cost", time.perf_counter(), req=req_id, computed=num_computed_tokens, found=len(tiers),
                         take=take, load_s=round(load_s, 5), saved_s=round(saved_s, 5), ahead=self._round_tokens,
                         **self.costs.snapshot(tiers))
        claim = max(num_computed_tokens, min((first + take) * c, limit))
        if req_id is not None:
            self._decisions[req_id] = _Decision(hit - claim, load_s, saved_s, tiers[:take])
        if take < len(tiers):  # not worth loading now: have the slower tiers' chunks closer next time
            self._promote_below(keys[first + take:first + len(tiers)], tiers[take:])
        return claim - num_computed_tokens

    def _promote_below(self, keys: Sequence[bytes], tiers: Sequence[str]) -> None:
        """Have the worker copy the chunks of ``keys`` held below the cpu tier up to it, in the
        background (sent with the next step's plan: the worker's store is the one that loads)."""
        for key, tier in zip(keys, tiers):
            if tier != "cpu" and len(self._to_promote) < _PROMOTE_MAX:
                self._to_promote[key] = None

    # ------------------------------------------------------------ allocation
    def on_alloc(self, req_id: str, block_ids: Sequence[int], num_external_tokens: int,
                 parked: bool = False) -> None:
        """The engine allocated ``block_ids`` (the whole table) and will treat
        ``num_external_tokens`` tokens as loaded by us in this step; with ``parked`` the
        request waits off the batch until the load finished (vLLM's async-load path)."""
        r = self.reqs.setdefault(req_id, _Req())
        r.block_ids = list(block_ids)
        r.external = max(0, int(num_external_tokens))
        self._round_tokens += self._to_compute.pop(req_id, 0)
        r.parked = parked and r.external > 0
        if r.external:
            self._allocated[req_id] = r
        d = self._decisions.pop(req_id, None)
        if d is not None and self.costs is not None:
            self.stats["cost_skipped_tokens"] += d.skipped_tokens
            if r.external:
                self.stats["predicted_load_us"] += int(d.load_s * 1e6)
                self.stats["predicted_saved_us"] += int(d.saved_s * 1e6)
                counts: dict[str, int] = {}
                for t in d.tiers:
                    counts[t] = counts.get(t, 0) + 1
                self.costs.promise(counts)
                if r.parked:
                    r.parked_at = time.monotonic()
                    r.parked_reads_s = max(0.0, d.load_s - self.costs.load_overhead_s)

    def note_failed_blocks(self, block_ids: set[int]) -> None:
        """The engine was told these blocks failed to load: their requests recompute.

        A request whose parked load failed entirely comes back with nothing computed and is
        looked up again; parking it again hangs vLLM 0.32 (its reservation for the first
        load is still counted against the second), so it recomputes instead.
        """
        for r in self.reqs.values():
            if not block_ids.isdisjoint(r.block_ids):
                r.load_failed = True

    def blocks_from_failure(self, block_ids: set[int]) -> set[int]:
        """Every request's blocks from its first block in ``block_ids`` on: what a failed step left
        in them (unloaded KV, KV computed on it) is wrong until the request recomputes them."""
        out: set[int] = set()
        for r in self.reqs.values():
            for i, b in enumerate(r.block_ids):
                if b in block_ids:
                    out.update(r.block_ids[i:])
                    break
        return out

    def on_loads_finished(self, req_ids: Iterable[str], step_s: float) -> None:
        """The engine heard that the parked loads of ``req_ids`` finished: each waited from its
        allocation until now, and waits one more step (``step_s``: :meth:`on_step_done`'s) before it
        is scheduled. Beside its predicted reads, that is the load's fixed cost. Measured to here,
        not to the step that computes the request: a busy engine may keep a request waiting for
        budget after its load, as it would have without one."""
        now = time.monotonic()
        for req_id in req_ids:
            r = self.reqs.get(req_id)
            if r is None or not r.parked_at:
                continue
            if not r.load_failed and self.costs is not None:
                self.costs.observe_load_wait(now - r.parked_at + step_s, r.parked_reads_s)
            r.parked_at = 0.0

    def load_failed(self, req_id: str) -> bool:
        r = self.reqs.get(req_id)
        return r is not None and r.load_failed

    def allocated(self) -> Collection[str]:
        """Requests allocated with tokens to load since the last plan (not planned yet)."""
        return self._allocated.keys()

    def parked_ids(self) -> list[str]:
        """Requests allocated for a parked load in this scheduling pass, not planned yet."""
        return [i for i, r in self._allocated.items() if r.parked and r.external]

    # ------------------------------------------------------------ one step
    def _plan_load(self, req_id: str, r: _Req, tokens: Sequence[int], end: int, leases: list) -> LoadSpec:
        """The load of ``r.external`` tokens ending at the engine's count ``end`` (this step's)."""
        c, bs = self.chunk_size, self.block_size
        start = end - r.external
        first = start // c
        last = -(-end // c)  # exclusive
        keys: list[bytes] = []
        if start < 0 or end > len(tokens) - 1 or -(-end // bs) > len(r.block_ids):
            log.error("kvtier: cannot plan load of %s [%d, %d) (tokens %d, blocks %d); "
                      "reporting it failed", req_id, start, end, len(tokens), len(r.block_ids))
            start = max(start, 0)
        else:
            keys = self.keys(tokens, last, req_id)[first:last]
            if len(keys) != last - first:
                keys = []
            else:
                leases.append(self.store.lease(keys))
        self.stats["loads"] += 1
        self.stats["load_tokens"] += end - start
        r.external = 0
        r.parked = False
        return LoadSpec(req_id, start, end, first, keys, list(r.block_ids))

    def on_step(self, scheduled: Sequence[ScheduledRequest],
                parked: Sequence[ScheduledRequest] = ()) -> StepPlan:
        """Plan one step: loads and saves of the ``scheduled`` requests, and the loads of
        ``parked`` ones (:meth:`parked_ids`, with the engine's count of this step)."""
        plan = StepPlan()
        self._round_tokens = 0  # this round's admissions are in; the next round starts empty
        self._to_compute.clear()
        step_leases: list = []
        saving: set[bytes] = set()
        c, bs = self.chunk_size, self.block_size
        for p in parked:
            r = self.reqs.get(p.req_id)
            if r is not None and r.parked and r.external:
                plan.parked_loads.append(self._plan_load(p.req_id, r, p.token_ids, p.num_computed_tokens,
                                                         step_leases))
        reqs = self.reqs
        work_tokens, work_attention, work_context = 0, 0.0, 0
        for s in scheduled:  # every running request, every step: kept to plain local arithmetic
            new, computed = s.num_new_tokens, s.num_computed_tokens
            work_tokens += new
            if new >= QUERY_TILE:
                work_attention += new * (computed + new / 2)
            elif new:
                work_context += computed + new
            r = reqs.get(s.req_id)
            if r is None:
                r = reqs[s.req_id] = _Req()
            if s.replace_blocks:
                r.block_ids = list(s.block_ids or ())
            elif s.block_ids:
                r.block_ids.extend(s.block_ids)
            tokens = s.token_ids
            # --- load: the range ends at the engine's count of this step.
            if r.external:
                plan.loads.append(self._plan_load(s.req_id, r, tokens, computed, step_leases))
            # --- saves: full chunks computed by the end of this step, not stored yet.
            done = min(computed + new, len(tokens))
            if done // c <= r.chunks_considered:  # a decode step inside a chunk: nothing to save
                continue
            n_full = min(done // c, len(r.block_ids) * bs // c)
            if self.saves and n_full > r.chunks_considered:
                keys = self.keys(tokens, n_full, s.req_id)
                cand = [i for i in range(r.chunks_considered, n_full) if keys[i] not in saving]
                stored = self._contains([keys[i] for i in cand]) if cand else []
                todo = [i for i, present in zip(cand, stored) if not present]
                self.stats["skipped_stored"] += len(cand) - len(todo)
                if todo:
                    plan.saves.append(SaveSpec(s.req_id, todo, [keys[i] for i in todo], list(r.block_ids)))
                    saving.update(keys[i] for i in todo)
                    self.stats["save_chunks"] += len(todo)
                r.chunks_considered = n_full
        plan.work_tokens += work_tokens
        plan.work_attention += work_attention
        plan.work_context += work_context
        # An allocation the engine did not schedule (should not happen) must not leak a load.
        for r in self._allocated.values():
            r.external = 0
            r.parked = False
        self._allocated.clear()
        if self._to_promote:
            plan.promote, self._to_promote = list(self._to_promote), {}
        self._step_leases.append(step_leases)
        self._planned_at = time.monotonic()
        while len(self._step_leases) > 64:  # output of old steps never reported: do not hold forever
            self.on_step_done()
        return plan

    def on_step_done(self) -> float:
        """The engine processed the output of the oldest planned step: its loads are done.
        Returns the time since the engine last planned a step: the step just done (without async
        scheduling; with it, the part of it after the next one was planned).

        Not the time since the previous output: after the engine sat idle that is the idle time,
        counted as a step against the load that finished in it (a one-off 1 s sample that made
        every later load look slower than computing). Not since the oldest planned step either:
        vLLM reports no output for a step that ran no forward and moved no KV (a parked load's
        request waiting alone), so that step may be long past."""
        if self._step_leases:
            for lease in self._step_leases.popleft():
                lease.release()
        return time.monotonic() - self._planned_at if self._planned_at else 0.0

    def extend_blocks(self, req_id: str, block_ids: Sequence[int]) -> bool:
        """A running request's new blocks, in a step that plans nothing for it (no load, no chunk
        completed): appended to its table without a plan. False if the ledger does not know it."""
        r = self.reqs.get(req_id)
        if r is None:
            return False
        r.block_ids.extend(block_ids)
        return True

    def on_finished(self, req_id: str) -> None:
        self.reqs.pop(req_id, None)
        self._allocated.pop(req_id, None)
        self._decisions.pop(req_id, None)
        self._chains.pop(req_id, None)

    def block_ids(self, req_id: str) -> list[int] | None:
        r = self.reqs.get(req_id)
        return None if r is None else list(r.block_ids)
