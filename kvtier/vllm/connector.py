"""``KVTierConnector``: vLLM's v1 KV connector API over kvtier's store.

A thin adapter: it translates vLLM objects into the engine-agnostic
:class:`~kvtier.vllm.scheduler.PrefixLedger` (scheduler side) and
:class:`~kvtier.vllm.worker.KVWorker` (worker side) and back. Enable with::

    --kv-transfer-config '{"kv_connector":"KVTierConnector",
                           "kv_connector_module_path":"kvtier.vllm",
                           "kv_role":"kv_both",
                           "kv_connector_extra_config":{"chunk_size":256,"tiers":["cpu","disk"]}}'

Layer-wise: the step's loads and saves are planned in ``start_load_kv`` (or at
the first layer hook, whichever comes first); ``wait_for_layer_load(layer)``
puts that layer's loaded KV in place before its attention (GPU: the forward's
stream waits for that layer's copy, enqueued at the start; CPU: copied then);
``save_kv_layer(layer)`` copies that layer out right after its attention;
``wait_for_save`` finishes the loads before the step returns, and the saves on CPU (on a
GPU they finish in kvtier's save thread; ``handle_preemptions`` of a later step waits for
those whose blocks it hands out). The copies are
:mod:`kvtier.transfer`'s gather/scatter (Triton kernels on a GPU, torch on CPU).
See docs/vllm.md and :mod:`kvtier.vllm.worker`.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import itertools
import logging
import math
import os
import sys
import time
import weakref
from collections.abc import Callable, Collection, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

import torch

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorWorkerMetadata,
)

from kvtier.config import ConfigError, KVTierConfig
from kvtier.costs import QUERY_TILE, CostModel, StepClock
from kvtier import trace
from kvtier.keys import Namespace, rank_keys
from kvtier.layout import ChunkLayout, dtype_name
from kvtier.server.client import get_remote_store
from kvtier.store import get_store
from kvtier.trace import record, span
from kvtier.transfer import LayoutError, PagedKV
from kvtier.vllm.compat import HOST_HIT_SOURCE
from kvtier.vllm.ranks import RankAgreement
from kvtier.vllm.scheduler import PrefixLedger, ScheduledRequest, StepPlan
from kvtier.vllm.stats import (LATENCY, STEP_HOST, KVTierPromMetrics, KVTierStats, StepHostTime, Totals,
                               scheduler_counters, worker_counters)
from kvtier.vllm.worker import KVWorker

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

log = logging.getLogger("kvtier.vllm")

# Live connectors of this process (tests and the demo read their stats).
INSTANCES: "weakref.WeakSet[KVTierConnector]" = weakref.WeakSet()


def _engine_thread(boundary: str = ""):
    """Time a connector hook into its step's host time (``self._host``). ``boundary``: "before"
    closes the previous step before the hook runs, "after" closes the step once it ran."""
    def wrap(fn):
        name = f"hook.{fn.__name__}"

        @functools.wraps(fn)
        def timed(self, *args, **kwargs):
            host = self.__dict__.get("_host")
            if host is None:  # not constructed by vLLM (a test drives one half)
                return fn(self, *args, **kwargs)
            if boundary == "before":
                host.close()
            t, c = time.perf_counter(), (time.thread_time() if trace.ON else 0.0)
            try:
                return fn(self, *args, **kwargs)
            finally:
                dt = time.perf_counter() - t
                host.add(dt)
                if trace.ON:  # which hook a step's host time went to, and how much of it was waiting
                    record(name, t, dt, cpu=time.thread_time() - c)
                    trace.flush()  # after the hook's time was taken: the write is the trace's cost
                if boundary == "after":
                    host.close()
        return timed
    return wrap


class KVTierMetadata(KVConnectorMetadata):
    """What the scheduler side sends to the workers for one step (picklable)."""

    def __init__(self, plan: StepPlan, kept: frozenset[str] | None = None,
                 fresh: frozenset[int] | None = None) -> None:
        self.loads = plan.loads
        self.saves = plan.saves
        self.parked_loads = plan.parked_loads
        # Timed by the worker (kvtier.costs).
        self.work = (plan.work_tokens, plan.work_attention, plan.work_context)
        self.promote = plan.promote  # copied up to the worker's cpu tier in the background
        # What KVWorker.fence_saves needs to know which saves still copying to wait for before
        # the step writes: the blocks handed to requests in this step, or, where those are not
        # known (None, under MultiConnector), the requests that keep their blocks (scheduled, not resumed).
        self.kept = kept
        self.fresh = fresh


class KVTierWorkerMetadata(KVConnectorWorkerMetadata):
    """What a worker tells the scheduler after a step: its cpu tier's changes and its cost
    observations (reads, step times; :mod:`kvtier.costs`), picklable.

    Only acted on when the worker runs in another process (``pid``): in one process
    the scheduler shares the worker's store and sees its cpu tier and cost model directly.
    """

    def __init__(self, pid: int, added: list[bytes], removed: list[bytes], costs: list | None = None) -> None:
        self.pid, self.added, self.removed = pid, added, removed
        self.costs = costs or []

    def aggregate(self, other: "KVTierWorkerMetadata") -> "KVTierWorkerMetadata":
        # Tensor-parallel ranks: the union (only rank 0 reports chunks: the scheduler looks up its keys).
        return KVTierWorkerMetadata(self.pid, self.added + other.added, self.removed + other.removed,
                                    self.costs + other.costs)


def for_rank(meta: KVTierMetadata, namespace: Namespace, hash_name: str) -> KVTierMetadata:
    """``meta`` with the chunk keys of TP rank ``namespace.tp_rank`` (the scheduler plans with rank
    0's; :func:`kvtier.keys.rank_keys`). A copy: under one process the plan is the scheduler's own."""
    out = copy.copy(meta)
    rekey = lambda specs: [dataclasses.replace(s, keys=rank_keys(namespace, s.keys, hash_name))  # noqa: E731
                           for s in specs]
    out.loads, out.saves, out.parked_loads = rekey(meta.loads), rekey(meta.saves), rekey(meta.parked_loads)
    out.promote = rank_keys(namespace, meta.promote, hash_name)
    return out


def _engine_facts(vllm_config: "VllmConfig", kv_cache_config: "KVCacheConfig | None"):
    """(block_size, num_layers, num_kv_heads, head_size, dtype, mla) of the attention cache."""
    if kv_cache_config is None:
        raise ConfigError("kvtier needs vLLM's kv_cache_config (vLLM >= 0.11 passes it to connectors)")
    groups = kv_cache_config.kv_cache_groups
    if len(groups) != 1:
        raise ConfigError(
            f"kvtier supports models with one KV cache group (full attention); this model has "
            f"{len(groups)} ({', '.join(type(g.kv_cache_spec).__name__ for g in groups)})"
        )
    spec = groups[0].kv_cache_spec
    for attr in ("num_kv_heads", "head_size", "dtype", "block_size"):
        if not hasattr(spec, attr):
            raise ConfigError(f"kvtier cannot store KV cache of kind {type(spec).__name__}")
    mla = type(spec).__name__.startswith("MLA")
    return spec.block_size, len(groups[0].layer_names), spec.num_kv_heads, spec.head_size, spec.dtype, mla


def schedules_ahead(vllm_config: "VllmConfig") -> bool:
    """Whether the engine schedules a step before the previous one's output is back
    (async scheduling, or several batches in flight with pipeline parallelism)."""
    if getattr(vllm_config.scheduler_config, "async_scheduling", False):
        return True
    try:
        return int(getattr(vllm_config, "max_concurrent_batches", 1)) > 1
    except (TypeError, ValueError):
        return False


# How long vLLM's sleep (unregister_kv_caches) waits for parked loads still fetching.
SLEEP_DRAIN_TIMEOUT_S = 30.0

# A parked load of more bytes than this waits off the batch (a background load) when other
# requests run in its step: inline, its copy would hold their next forward for longer than
# ~1 ms at PCIe Gen5 speed (55 GB/s). Smaller ones, and any load into an idle engine, go inline.
BUSY_INLINE_MAX_BYTES = 64 << 20


def parks_loads(config: KVTierConfig, vllm_config: "VllmConfig") -> bool:
    """Whether every load goes through vLLM's async-load path (the request waits off the batch).

    A failed load of a request that has a later step in flight is not recovered
    soundly by vLLM's scheduler (0.24 and 0.32: its async scheduler asserts or keeps
    a token sampled from the unloaded blocks; docs/vllm.md). A parked request has no
    step in flight, so under async scheduling every load is parked. Otherwise ``auto``
    parks only loads larger than :data:`BUSY_INLINE_MAX_BYTES` (see ``KVTierConnector``).
    """
    ahead = schedules_ahead(vllm_config)
    if config.load_mode == "sync" and ahead:
        raise ConfigError(
            "load_mode='sync' with async scheduling: vLLM cannot recover a failed synchronous load of "
            "a request that already has its next step in flight (the engine dies or keeps a wrong "
            "token). Use load_mode='auto' (loads wait off the batch), or turn async scheduling off "
            "(--no-async-scheduling, or async_scheduling=False in Python)")
    return config.load_mode == "async" or (config.load_mode == "auto" and ahead)


def _constructors_of(connector: KVConnectorBase_V1) -> list:
    """The objects whose methods are on the stack while ``connector`` is built, innermost first
    (a MultiConnector parent, vLLM's scheduler): what no API of vLLM's hands the connector."""
    owners = []
    frame = sys._getframe(1)
    while frame is not None:
        owner = frame.f_locals.get("self")
        if owner is not None and owner is not connector:
            owners.append(owner)
        frame = frame.f_back
    return owners


def _transfer_configs(vllm_config: "VllmConfig", connector: KVConnectorBase_V1) -> list:
    """kvtier's transfer config and those of the connectors that created it.

    Under ``MultiConnector`` kvtier gets a copy of the engine's config holding its own
    child transfer config, while vLLM's scheduler reads the parent's (e.g. its
    ``kv_load_failure_policy``); the parent connector is the caller of our constructor.
    """
    configs = [vllm_config.kv_transfer_config]
    for owner in _constructors_of(connector):
        if isinstance(owner, KVConnectorBase_V1):
            tc = getattr(getattr(owner, "_vllm_config", None), "kv_transfer_config", None)
            if tc is not None and all(tc is not c for c in configs):
                configs.append(tc)
    return configs


def kv_role(vllm_config: "VllmConfig", config: KVTierConfig) -> tuple[bool, bool]:
    """(loads, saves) of this engine from vLLM's ``kv_role``: ``kv_producer`` (a prefill
    instance) saves and never loads, ``kv_consumer`` (a decode instance) loads and saves only
    with ``consumer_saves``, ``kv_both`` does both."""
    tc = vllm_config.kv_transfer_config
    role = getattr(tc, "kv_role", None) or "kv_both"
    if role == "kv_producer":
        return False, True
    if role == "kv_consumer":
        return True, bool(config.consumer_saves)
    return True, True


def _engine_scheduler(connector: KVConnectorBase_V1) -> "weakref.ref | None":
    """vLLM's scheduler constructing ``connector`` (a weak reference; its ``kv_cache_manager`` is made
    after the connector)."""
    for owner in _constructors_of(connector):
        if hasattr(owner, "update_from_output") and hasattr(owner, "schedule"):
            return weakref.ref(owner)
    return None


def load_config(vllm_config: "VllmConfig", block_size: int) -> KVTierConfig:
    """kvtier's config from ``kv_connector_extra_config`` (+ env / YAML), checked against the engine."""
    extra = dict(vllm_config.kv_transfer_config.kv_connector_extra_config or {})
    config = KVTierConfig.from_sources(extra=extra)
    if config.chunk_size % block_size:
        good = math.lcm(config.chunk_size, block_size)
        raise ConfigError(
            f"chunk_size={config.chunk_size}: must be a multiple of the engine's block size "
            f"({block_size}); use e.g. chunk_size={good}"
        )
    return config


def quiet_split(req_ids: Sequence[str], computed: Sequence[int], new: np.ndarray, new_blocks: Sequence,
                chunk: int, busy: Collection[str], extend: Callable[[str, list[int]], bool]
                ) -> tuple[list[int], int, float, float]:
    """Of a step's running requests, the quiet ones have nothing to plan: not in ``busy`` (loading,
    resumed), and no chunk completed by their ``new`` tokens after ``computed``. Their new blocks
    go onto the ledger's tables (``extend``; a request it does not know is planned instead).
    Returns (indices of the others, the quiet ones' tokens, attention and context work), counted as
    :meth:`PrefixLedger.on_step` does (attention: requests of QUERY_TILE new tokens or more; context:
    the others, decodes). In numpy: a decode batch of hundreds passes here every step (issue 28); at
    512 requests ~1.8x faster than a loop (49 vs 89 us), below ~100 slower (11 us of fixed cost)."""
    cp = np.fromiter(computed, np.int64, len(computed))
    quiet = cp % chunk + new < chunk
    if busy:
        quiet &= np.fromiter((r not in busy for r in req_ids), bool, len(req_ids))
    if new_blocks.count(None) != len(new_blocks):  # each request gets a block every block_size tokens
        for i in [i for i, b in enumerate(new_blocks) if b is not None]:
            if quiet[i] and not extend(req_ids[i], new_blocks[i][0]):
                quiet[i] = False
    n = np.where(quiet, new, 0)
    loud = np.flatnonzero(~quiet).tolist()
    if n.max(initial=0) < QUERY_TILE:  # decodes only, the usual batch: each reads its context
        return loud, int(n.sum()), 0.0, int(np.minimum(n, 1) @ (cp + n))
    tiled = n * (n >= QUERY_TILE)  # new tokens of requests computing a tile of queries or more
    reads = n - tiled  # of the others, each reading its context (np.minimum: 1 where any)
    return loud, int(n.sum()), int(tiled @ (2 * cp + tiled)) / 2, int(np.minimum(reads, 1) @ (cp + reads))


class KVTierConnector(KVConnectorBase_V1):
    """kvtier as a vLLM v1 KV connector (``kv_role`` ``kv_both``, ``kv_producer`` or ``kv_consumer``:
    :func:`kv_role`)."""

    if HOST_HIT_SOURCE is not None:
        _cache_hit_source = HOST_HIT_SOURCE

    def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole,
                 kv_cache_config: "KVCacheConfig | None" = None) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        block_size, layers, heads, head_size, dtype, mla = _engine_facts(vllm_config, kv_cache_config)
        self.config = load_config(vllm_config, block_size)
        self.block_size = block_size
        self.num_kv_heads, self.head_size, self.mla = heads, head_size, mla
        tp_size = vllm_config.parallel_config.tensor_parallel_size
        tp_rank = 0
        if role == KVConnectorRole.WORKER and tp_size > 1:
            from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

            tp_rank = get_tensor_model_parallel_rank()
        self.namespace = Namespace(
            model=self.config.model or vllm_config.model_config.model, kv_dtype=dtype_name(dtype),
            num_layers=layers, num_kv_heads=heads, head_size=head_size, tp_rank=tp_rank, tp_size=tp_size,
            extra="mla" if mla else "",
        )
        width = head_size if mla else heads * head_size
        self.layout = ChunkLayout(layers, self.config.chunk_size, width, dtype, mla)
        # In process, or a client of a `kvtier serve` process (same methods).
        open_store = get_remote_store if self.config.server else get_store
        with span("connector.open_store", role=role.name):  # start-up: the host pool, the tiers, a writer
            self.store = open_store(self.config, self.layout, self.namespace.label())
        self._requests: dict[str, Request] = {}
        self.ledger: PrefixLedger | None = None
        self.worker: KVWorker | None = None
        self._layer_index: dict[str, int] = {}
        self._failed_blocks: set[int] = set()
        self._step_meta: KVTierMetadata | None = None  # the step whose loads/saves are planned
        self._step_failed_reqs: set[str] = set()
        self._step_failed_blocks: set[int] = set()
        self._ranks: RankAgreement | None = None  # TP > 1: the step's failed loads, over every rank
        self._parked_meta: KVTierMetadata | None = None  # the step whose parked loads started
        self._clock = StepClock(None, None)  # times the engine's steps for the cost model (worker side)
        self._host = StepHostTime("scheduler" if role == KVConnectorRole.SCHEDULER else "worker")
        self.park = parks_loads(self.config, vllm_config)
        # auto: a load of at least this many tokens is parked too, and goes to the background
        # when other requests run in its step (load_mode async: every parked load does).
        per_token = max(1, self.layout.nbytes // self.config.chunk_size)
        self.large_load_tokens = max(1, BUSY_INLINE_MAX_BYTES // per_token)
        self._parks: dict[str, bool] = {}  # request -> parked, as answered by its latest lookup
        self._totals = Totals(self._host.side)  # counters reported to vLLM's metrics so far
        self._sees_all_allocations = True  # no other connector allocates blocks unseen by us
        self._scheduler: weakref.ref | None = None  # vLLM's scheduler (scheduler side): see _uncache
        self.loads, self.saves = kv_role(vllm_config, self.config)
        # A prefill instance's response goes to the proxy, which sends the request to the decode
        # instance at once: its chunks are committed before the step returns (on a GPU the save
        # thread would commit them a little later, and the decode instance would miss them).
        self.commit_saves_in_step = not self.loads
        if role == KVConnectorRole.SCHEDULER:
            costs = getattr(self.store, "costs", None)
            if costs is None:  # a `kvtier serve` store: its reads are not seen here, seeds only
                costs = CostModel(self.config.chunk_size, self.layout.nbytes, vllm_config.device_config.device_type,
                                  self.config.prefill_gbps)
            costs.max_step_tokens = max(1, int(vllm_config.scheduler_config.max_num_batched_tokens or 8192))
            # A decode instance never computes what it can load (that is the prefill's work, and
            # would stall its decoding): every hit is loaded, whatever the cost model says.
            policy = self.config.load_policy if self.saves or not self.loads else "always"
            self.ledger = PrefixLedger(self.store, self.namespace, self.config.chunk_size, block_size,
                                       self.config.hash, costs, policy, loads=self.loads, saves=self.saves)
            self._scheduler = _engine_scheduler(self)
            configs = _transfer_configs(vllm_config, self)
            # Under MultiConnector another connector's loads get blocks kvtier is not told of.
            self._sees_all_allocations = len(configs) == 1
            # A kvtier miss (evicted, corrupt, tier down) must be recomputed, never fail a request.
            for tc in configs:
                if getattr(tc, "kv_load_failure_policy", "recompute") != "recompute":
                    log.warning("kvtier: setting kv_load_failure_policy='recompute' (was %r) for %s: a chunk "
                                "that cannot be loaded is recomputed by the engine",
                                tc.kv_load_failure_policy, tc.kv_connector)
                    tc.kv_load_failure_policy = "recompute"
        INSTANCES.add(self)
        log.info("kvtier connector (%s, %s): chunk %d tokens, tiers %s, %s, %s loads", role.name,
                 "loads and saves" if self.loads and self.saves else "loads only" if self.loads else
                 "saves only" if self.saves else "neither loads nor saves",
                 self.config.chunk_size, ",".join(self.config.tiers), self.layout.describe(),
                 "parked (async)" if self.park else
                 "layer-wise (sync), parked when large" if self.config.load_mode == "auto" else "layer-wise (sync)")

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # a best-effort cache: a dropped save is a future miss

    # ================================================================ scheduler side
    def on_new_request(self, request: "Request") -> None:
        self._requests[request.request_id] = request

    @_engine_thread()
    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> tuple[int, bool]:
        self._requests[request.request_id] = request
        if self.ledger.load_failed(request.request_id):
            return 0, False  # see PrefixLedger.note_failed_blocks
        with span("sched.lookup", tokens=request.num_tokens) as f:
            try:
                n = self.ledger.num_new_matched_tokens(request.all_token_ids, num_computed_tokens,
                                                       request.request_id)
            except Exception:  # a lookup problem is a miss, never a dead scheduler
                log.exception("kvtier: lookup failed for %s; treating as a miss", request.request_id)
                n = 0
            f["hit"] = n
        park = n > 0 and (self.park or (self.config.load_mode == "auto" and n >= self.large_load_tokens))
        self._parks[request.request_id] = park
        return n, park

    @_engine_thread()
    def update_state_after_alloc(self, request: "Request", blocks, num_external_tokens: int) -> None:
        self._requests[request.request_id] = request
        (block_ids, *_) = blocks.get_block_ids()
        self.ledger.on_alloc(request.request_id, block_ids, num_external_tokens,
                             parked=self._parks.get(request.request_id, False))

    @_engine_thread("after")
    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVTierMetadata:
        with span("sched.build_meta") as f:
            meta = self._build_meta(scheduler_output)
            f.update(loads=len(meta.loads), parked=len(meta.parked_loads), saves=len(meta.saves))
        return meta

    def _build_meta(self, scheduler_output: "SchedulerOutput") -> KVTierMetadata:
        spec = scheduler_output.scheduled_spec_decode_tokens
        nst = scheduler_output.num_scheduled_tokens
        steps: list[ScheduledRequest] = []
        for new in scheduler_output.scheduled_new_reqs:
            req = self._requests.get(new.req_id)
            tokens = req.all_token_ids if req is not None else (new.prompt_token_ids or [])
            steps.append(ScheduledRequest(
                new.req_id, tokens, new.num_computed_tokens,
                nst.get(new.req_id, 0) - len(spec.get(new.req_id, ())), new.block_ids[0], True))
        cached = scheduler_output.scheduled_cached_reqs
        requests, resumed, c = self._requests, cached.resumed_req_ids, self.config.chunk_size
        loading = self.ledger.allocated()
        # Every running request, every step (a decode batch of hundreds): the quiet ones, which have
        # nothing to plan, are told apart in numpy; only their work is counted.
        ids = cached.req_ids
        new = np.fromiter(map(nst.get, ids, itertools.repeat(0)), np.int64, len(ids))
        if spec:
            new -= np.fromiter((len(spec.get(r, ())) for r in ids), np.int64, len(ids))
        planned = loading | resumed if loading else resumed  # never quiet
        loud, quiet_tokens, quiet_attention, quiet_context = quiet_split(
            ids, cached.num_computed_tokens, new, cached.new_block_ids, c, planned, self.ledger.extend_blocks)
        for i in loud:
            req_id, new_blocks = ids[i], cached.new_block_ids[i]
            req = requests.get(req_id)
            if req is None:
                continue
            steps.append(ScheduledRequest(req_id, req.all_token_ids, cached.num_computed_tokens[i], int(new[i]),
                                          None if new_blocks is None else new_blocks[0], req_id in resumed))
        # Parked loads end at the engine's count of this step, which vLLM set after the allocation.
        parked = [ScheduledRequest(i, self._requests[i].all_token_ids, self._requests[i].num_computed_tokens,
                                   0, None, False) for i in self.ledger.parked_ids() if i in self._requests]
        plan = self.ledger.on_step(steps, parked)
        plan.work_tokens += quiet_tokens
        plan.work_attention += quiet_attention
        plan.work_context += quiet_context
        busy = scheduler_output.total_num_scheduled_tokens > 0
        for spec in plan.parked_loads:  # off the batch: every load, or a large one beside running requests
            large = spec.end - spec.start >= self.large_load_tokens
            spec.background = self.config.load_mode == "async" or (busy and large)
        if self._sees_all_allocations:  # the worker's save fence tests blocks; the requests kept are not needed
            return KVTierMetadata(plan, None, frozenset(self._fresh_blocks(scheduler_output, plan)))
        return KVTierMetadata(plan, frozenset(cached.req_ids).difference(resumed), None)

    def _fresh_blocks(self, scheduler_output: "SchedulerOutput", plan: StepPlan) -> set[int]:
        """Blocks handed to requests in this step that the step may write: a new or resumed
        request's table from its first block not already computed (the blocks below are
        prefix-cache hits, full and only read; a kvtier load writes from its start), a running
        request's new blocks, a parked load's blocks from its start."""
        bs = self.block_size
        load_start = {ld.req_id: ld.start for ld in plan.loads}

        def first_written(req_id: str, computed: int) -> int:
            """Index of a whole table's first block this step may write."""
            return min(load_start.get(req_id, computed), computed) // bs

        fresh: set[int] = set()
        for new in scheduler_output.scheduled_new_reqs:
            fresh.update(new.block_ids[0][first_written(new.req_id, new.num_computed_tokens):])
        cached = scheduler_output.scheduled_cached_reqs
        for i, ids in enumerate(cached.new_block_ids):
            if ids is None:
                continue
            req_id = cached.req_ids[i]
            # A resumed request's ids are its whole table, prefix-cache hits first; others' are new.
            first = first_written(req_id, cached.num_computed_tokens[i]) if req_id in cached.resumed_req_ids else 0
            fresh.update(ids[0][first:])
        for spec in plan.parked_loads:  # allocated for loads off the batch: not scheduled
            fresh.update(spec.block_ids[spec.start // bs:])
        return fresh

    @_engine_thread()
    def update_connector_output(self, connector_output) -> None:
        meta = getattr(connector_output, "kv_connector_worker_meta", None)
        if isinstance(meta, KVTierWorkerMetadata) and meta.pid != os.getpid():
            self.ledger.note_worker_chunks(meta.added, meta.removed)
            if self.ledger.costs is not None:
                self.ledger.costs.absorb(meta.costs)
        invalid = getattr(connector_output, "invalid_block_ids", None)
        if invalid:
            self._uncache(set(invalid))
            self.ledger.note_failed_blocks(set(invalid))
        step_s = self.ledger.on_step_done()
        done = getattr(connector_output, "finished_recving", None)
        if done:  # after note_failed_blocks: a failed load is no sample
            self.ledger.on_loads_finished(done, step_s)

    def _uncache(self, invalid: set[int]) -> None:
        """Take the blocks of a failed load, and those after them in the same requests, out of
        vLLM's prefix cache.

        vLLM registers a request's blocks in its prefix cache when it allocates them, before the
        step fills them; under ``kv_load_failure_policy="recompute"`` it leaves the failed ones
        there for the request to recompute. A request preempted before it did frees them with their
        hashes, and a later request (or the same one, resumed) hits the unloaded KV, or KV computed
        on it: wrong tokens (tests/vllm/test_engine_tp.py). Running requests keep their blocks;
        only new prefix-cache hits on them are gone.
        """
        blocks = self.ledger.blocks_from_failure(invalid) | invalid
        scheduler = self._scheduler() if self._scheduler is not None else None
        manager = getattr(scheduler, "kv_cache_manager", None)
        if manager is None or not hasattr(manager, "evict_blocks"):
            if not getattr(self, "_warned_uncache", False):
                self._warned_uncache = True
                log.warning("kvtier: cannot take failed blocks out of vLLM's prefix cache (no scheduler "
                            "kv_cache_manager.evict_blocks found); a request preempted before it recomputed "
                            "them could reuse them")
            return
        manager.evict_blocks(blocks)

    @_engine_thread()
    def request_finished(self, request: "Request", block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        self._requests.pop(request.request_id, None)
        self._parks.pop(request.request_id, None)
        self.ledger.on_finished(request.request_id)
        return False, None

    # ================================================================ worker side
    def register_kv_caches(self, kv_caches: dict) -> None:
        for name, t in kv_caches.items():
            if not isinstance(t, torch.Tensor):
                raise ConfigError(f"kvtier: layer {name}: a {type(t).__name__} per layer is not supported "
                                  f"(one KV cache tensor per layer expected)")
        if self.mla:  # vLLM's 4-D view of an MLA cache is [NB, 1, BS, D]: one latent row per token
            kv_caches = {n: t[:, 0] if t.dim() == 4 and t.shape[1] == 1 else t for n, t in kv_caches.items()}
        try:
            paged = PagedKV.from_vllm(kv_caches, block_size=self.block_size)
        except LayoutError as e:
            raise ConfigError(f"kvtier cannot use this engine's KV cache: {e}") from e
        heads = 1 if self.mla else self.num_kv_heads
        if (paged.kind == "mla") != self.mla or paged.width != self.layout.width or (
                paged.kind in ("cpu", "kv_split") and paged.num_pieces != heads):
            raise ConfigError(
                f"kvtier: the KV cache ({paged.describe()}) does not match the model's "
                f"{'MLA latent' if self.mla else f'{heads} KV heads'} x head size {self.head_size}")
        if paged.num_layers != self.layout.num_layers:
            raise ConfigError(f"kvtier: the engine registered {paged.num_layers} KV cache tensors, "
                              f"its config lists {self.layout.num_layers} layers")
        self.worker = KVWorker(self.store, paged, self.config.chunk_size, save_in_step=self.commit_saves_in_step)
        costs = getattr(self.store, "costs", None)
        worker = self.worker

        # Measured compute, beside predictions.
        def observe(tokens: int, attention: float, seconds: float, context: float) -> None:
            worker._count("step_us", int(seconds * 1e6))
            worker._count("step_tokens", tokens)
            if costs is not None:
                costs.observe_step(tokens, attention, seconds, context)

        self._clock = StepClock(paged.device, observe)
        self.store.metrics.keep_recent_latency()  # forwarded to vLLM's metrics (get_kv_connector_stats)
        self._layer_index = paged.layer_index
        if getattr(self.store, "cpu", None) is not None:
            self.store.cpu.track_changes()  # reported to the scheduler (build_connector_worker_meta)
        if self.namespace.tp_size > 1:
            self._ranks = RankAgreement.tensor_parallel()
        with span("worker.warm_up"):  # Triton: compile the kernels now, not in the first request's step
            self.worker.warm_up()
        log.info("kvtier: KV cache layout %s, transfer backend %s", paged.describe(),
                 self.worker.backend.__name__.rsplit(".", 1)[-1])

    @_engine_thread()
    def handle_preemptions(self, kv_connector_metadata: KVTierMetadata) -> None:
        """First thing of a step, before vLLM writes any block: saves still copying out of
        blocks that may have been freed and reused are waited for (KVWorker.fence_saves)."""
        self._fence_saves(kv_connector_metadata)

    @_engine_thread("before")
    def bind_connector_metadata(self, connector_metadata: KVTierMetadata) -> None:
        if self.namespace.tp_rank > 0:
            connector_metadata = for_rank(connector_metadata, self.namespace, self.config.hash)
        super().bind_connector_metadata(connector_metadata)
        self._fence_saves(connector_metadata)  # again, for an engine that does not call handle_preemptions

    def _fence_saves(self, meta: KVTierMetadata) -> None:
        if self.worker is not None:
            self.worker.fence_saves(getattr(meta, "kept", None), getattr(meta, "fresh", None))

    def _begin_step(self) -> None:
        """Plan the bound step's loads and saves, once (from whichever hook runs first).

        vLLM calls ``start_load_kv`` before the forward when the step has loads, and may
        call it after the forward otherwise; the layer hooks start the step too, so a
        load is never planned after the attention that needs it.
        """
        meta = self._get_connector_metadata()
        if self._step_meta is meta or self.worker is None:
            return
        self._step_meta = meta
        self.worker.before_forward()  # reported parked loads still copying: this forward waits for them
        self._clock.start(*getattr(meta, "work", (0, 0.0)))
        promote = getattr(self.store, "promote_later", None)
        if getattr(meta, "promote", None) and promote is not None:
            promote(meta.promote)
        with span("worker.begin_step", loads=len(meta.loads), saves=len(meta.saves)):
            blocks, reqs = self.worker.start_load(meta.loads) if meta.loads else (set(), set())
            self._failed_blocks |= blocks
            self._step_failed_blocks = set(blocks)
            self._step_failed_reqs = reqs
            if meta.saves:
                self.worker.start_save(meta.saves)

    def _start_parked(self) -> None:
        """Start the bound step's parked loads, once; :meth:`get_finished` reports them when done.

        Never from a layer hook: no forward reads these blocks before they are reported.
        """
        meta = self._get_connector_metadata()
        if self._parked_meta is meta or self.worker is None or not meta.parked_loads:
            return
        self._parked_meta = meta
        with span("worker.start_parked", loads=len(meta.parked_loads)):
            self.worker.park_load(meta.parked_loads)

    @_engine_thread()
    def start_load_kv(self, forward_context, **kwargs: Any) -> None:
        record("worker.step", time.perf_counter())
        self._begin_step()
        self._start_parked()

    @_engine_thread()
    def wait_for_layer_load(self, layer_name: str) -> None:
        self._begin_step()
        index = self._layer_index.get(layer_name)
        if index is not None:
            self.worker.load_layer(index)

    @_engine_thread()
    def save_kv_layer(self, layer_name: str, kv_layer, attn_metadata, **kwargs: Any) -> None:
        self._begin_step()
        index = self._layer_index.get(layer_name)
        if index is not None:
            self.worker.save_layer(index)

    @_engine_thread()
    def wait_for_save(self) -> None:
        self._begin_step()
        if self.worker is not None:
            self._clock.stop()  # the forward is issued; what follows is kvtier's own work
            with span("worker.wait_for_save"):
                blocks, reqs = self.worker.finish_load()
                self._failed_blocks |= blocks
                skip, failed = self._step_failed_reqs | reqs, self._step_failed_blocks | blocks
                meta = self._step_meta
                # TP: a load failed on any rank skips the saves depending on it on every rank
                # (kvtier.vllm.ranks). Only a step that loads and saves can need it; every rank
                # has the same metadata, so all of them take part in the exchange or none does.
                if self._ranks is not None and meta is not None and meta.loads and meta.saves:
                    skip, failed = self._ranks.union(skip, failed)
                self.worker.finish_save(skip_reqs=skip, failed_blocks=failed)
                if self.commit_saves_in_step:
                    self.worker.drain_saves()
                    # Visible to other instances before the response leaves, so the decode
                    # instance finds them (a `kvtier serve` client's commits are one-way).
                    if meta is not None and meta.saves:
                        self.store.publish_commits()
        self._step_meta = None
        self._step_failed_reqs = set()
        self._step_failed_blocks = set()

    @_engine_thread()
    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        """Parked loads done (or failed: their blocks are reported with them in this step)."""
        if self.worker is None:
            return None, None
        if getattr(self, "_connector_metadata", None) is not None:
            self._start_parked()
        with span("worker.get_finished") as f:
            done, blocks = self.worker.finished_parked()
            f["done"] = len(done)
        self._failed_blocks |= blocks
        return None, done or None

    @_engine_thread()
    def build_connector_worker_meta(self) -> KVTierWorkerMetadata | None:
        if self.worker is None:
            return None
        cpu = getattr(self.store, "cpu", None)
        added, removed = cpu.take_changes() if cpu is not None else ([], [])
        if self.namespace.tp_rank > 0:  # the scheduler looks up rank 0's keys only: never these
            added, removed = [], []
        costs = self.store.costs.take_observations() if hasattr(self.store, "costs") else []
        return KVTierWorkerMetadata(os.getpid(), added, removed, costs) if added or removed or costs else None

    # ================================================================ vLLM's metrics (kvtier.vllm.stats)
    def get_kv_connector_stats(self) -> KVTierStats | None:
        """The totals of kvtier's counters (every one, in every report): loads, saves and tiers
        (worker), lookups (scheduler); vLLM calls it every step on both sides, merges, logs and
        exports the reports (:mod:`kvtier.vllm.stats`)."""
        try:
            return self._stats_report()
        except Exception:  # metrics must never take the engine down
            log.exception("kvtier: building the metrics report failed; skipped")
            return None

    def _stats_report(self) -> KVTierStats | None:
        if self.worker is not None:
            metrics = getattr(self.store, "metrics", None)
            store_counts = {} if metrics is None else {
                "promoted_chunks": metrics.value("kvtier_promoted_chunks_total"),
                "dropped_writes": metrics.value("kvtier_dropped_writes_total")}
            report: dict[str, Any] = self._totals.take(worker_counters(self.worker.stats, self.store.tiers,
                                                                        store_counts))
            latency = self.store.metrics.take_recent_latency()
            if latency:
                report[LATENCY] = [list(x) for x in latency]
        elif self.ledger is not None:
            report = self._totals.take(scheduler_counters(self.ledger.stats))
        else:
            return None
        host = self._host.take()
        if host:
            report[STEP_HOST] = host
        return KVTierStats(data=report) if report else None

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVTierStats:
        return KVTierStats(data=dict(data or {}))

    @classmethod
    def build_prom_metrics(cls, vllm_config: "VllmConfig", metric_types: dict, labelnames: list[str],
                           per_engine_labelvalues: dict[int, list[object]]) -> KVTierPromMetrics:
        return KVTierPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    @_engine_thread()
    def get_block_ids_with_load_errors(self) -> set[int]:
        failed, self._failed_blocks = self._failed_blocks, set()
        return failed

    def unregister_kv_caches(self) -> None:
        """vLLM 0.33+ sleep mode, before it unmaps the KV cache: no kvtier copy may touch the cache
        after this returns. vLLM has synchronized the device, but the load thread may still fetch
        a parked load and copy it in, and the save thread may still be committing. A fetch stuck
        past :data:`SLEEP_DRAIN_TIMEOUT_S` in a lower tier copies nothing when it ends: its load
        is reported failed (recomputed)."""
        if self.worker is None:
            return
        self.worker.cache_mapped = False
        try:
            self.worker.drain_parked(SLEEP_DRAIN_TIMEOUT_S)
        except Exception as e:  # noqa: BLE001 - a stuck or failed fetch must not fail vLLM's sleep
            log.warning("kvtier: parked loads unfinished at sleep (%r); they copy nothing and are "
                        "reported failed", e)
        self.worker.drain_saves()

    def restore_kv_caches(self) -> None:
        """After wake-up: the cache is mapped again at the same addresses (its contents are gone,
        and so is vLLM's prefix cache); parked loads copy again."""
        if self.worker is not None:
            self.worker.cache_mapped = True

    def shutdown(self) -> None:
        try:
            if self.worker is not None:
                self.worker.drain_saves()
            self.store.flush(timeout=10.0)
        except Exception:
            log.exception("kvtier: flush at shutdown failed")
        trace.flush()
