"""Worker side: execute a step's loads and saves against the paged KV cache, layer by layer.

Engine-agnostic: the cache is a :class:`kvtier.transfer.PagedKV` (built by the
connector from vLLM's ``register_kv_caches``), and every copy goes through
:func:`kvtier.transfer.scatter` / :func:`~kvtier.transfer.gather` -- the torch
reference on CPU, the Triton kernels on a CUDA GPU. A step's loads (and its
saves) are planned once, all requests together, into one slot mapping over their
chunks (-1: token not written); each layer then moves with one call.

A step, as the connector drives it::

    start_load(loads); start_save(saves)     # before the forward: plan, fetch chunks
    for each layer: load_layer(l); <attention l>; save_layer(l)
    finish_load(); finish_save(skip)         # after the forward, before the step returns

Copies move a *group* of consecutive layers (``layers_per_copy``): one layer on CPU;
on a GPU as many as make each contiguous host run at least :data:`MIN_RUN_BYTES`,
because every DMA and kernel launch costs the host tens of microseconds and per-layer
runs of a chunk are small (Llama-8B: 512 KiB per layer and K/V of a 256-token chunk,
so 8 layers per copy). Measured in ``benchmarks/bench_layerwise.py``.

- **Loads.** A load writes only the slots of tokens in ``[start, end)``: a chunk
  that begins below ``start`` is read whole but its lower tokens map to -1, so
  blocks below ``start`` -- possibly shared through prefix caching with running
  requests -- are never touched. A chunk that cannot be had (evicted, corrupt, tier
  down) is left out of the plan and its blocks are reported as failed, for the
  engine to recompute. On a GPU every layer's copy is enqueued at ``start_load``
  (side streams, layer order) and ``load_layer(l)`` makes the forward's stream wait
  for layer ``l`` only, so the copy of later layers overlaps the compute of earlier
  ones; on CPU ``load_layer(l)`` copies layer ``l`` right before its attention.
  A layer whose ``load_layer`` never ran (its attention read the cache without
  waiting) or whose copy raised fails every load of the step at ``finish_load``:
  the engine recomputes rather than keep KV computed on a partial cache.
- **Saves.** ``save_layer(l)`` copies a group of layers of every planned chunk out of
  the paged cache into host slots once their attention has written them (on a GPU,
  enqueued behind the forward's work so far). On a GPU a step's saves are one copy of
  every layer, at the last layer's hook: nothing in the step waits for them, and one
  DMA per chunk instead of one per chunk and group is 4.5x fewer calls on the engine's
  thread (an 8K-token Llama-8B prefill: 64 instead of 288, ~4 ms of the step's host
  time). A prefill instance that commits its saves in the step (``save_in_step``)
  copies by layer groups, overlapping the later layers.
  ``finish_save`` copies layers whose hook did not run and decides which chunks to
  commit (requests whose load failed commit nothing). On CPU the copies are done and
  the chunks are committed at once. On a GPU the step does not wait for its copies: the
  save thread commits the chunks once they are done, and :meth:`KVWorker.fence_saves`,
  called before a later step writes anything, waits for every save still copying that
  reads blocks the engine may have handed to another request since (see there). Writing
  to lower tiers happens later, from host memory only.
"""

from __future__ import annotations

import array
import itertools
import logging
import threading
import time
from collections.abc import Container, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from kvtier.trace import span
from kvtier.transfer import PagedKV, Transfer, backend_for, gather, scatter
from kvtier.vllm.scheduler import LoadSpec, SaveSpec

log = logging.getLogger(__name__)

# Smallest contiguous host run a GPU layer-group copy should move (bytes of one chunk's K,
# or V, over the group's layers): a DMA this size takes ~75 us at PCIe Gen5 speed, several
# times the host cost of issuing it, so the host keeps ahead of the copy engine.
MIN_RUN_BYTES = 4 << 20

# A background load (chunks read from disk or a remote tier) is fetched and copied in batches of
# about this many bytes: on a GPU one batch's copy runs while the next is read (the H200 host's
# page cache gives 1 GiB to kvtier's disk reads in ~55 ms; the link copies it in ~20 ms).
PARKED_BATCH_BYTES = 256 << 20


def _layer_groups(num_layers: int, per_copy: int) -> list[tuple[int, int]]:
    """Consecutive ``[lo, hi)`` ranges of ``per_copy`` layers (the last may be shorter)."""
    return [(lo, min(lo + per_copy, num_layers)) for lo in range(0, num_layers, per_copy)]


class BlockRuns:
    """Blocks of token ranges of block tables, kept as runs: the set of block ids is built only
    when it is asked for (a load that failed), not for every load planned."""

    __slots__ = ("runs", "block_size")

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.runs: list[tuple[list[int], int, int]] = []  # (table, first block, end block)

    def add(self, block_ids: list[int], lo: int, hi: int) -> None:
        """The blocks of tokens ``[lo, hi)`` of ``block_ids``."""
        if hi <= lo:
            return
        a, b = lo // self.block_size, (hi - 1) // self.block_size + 1
        if self.runs and self.runs[-1][0] is block_ids and self.runs[-1][2] >= a:
            ids, a0, b0 = self.runs[-1]
            self.runs[-1] = (ids, min(a0, a), max(b0, b))
        else:
            self.runs.append((block_ids, a, b))

    def __iter__(self):
        return itertools.chain.from_iterable(ids[a:b] for ids, a, b in self.runs)

    def isdisjoint(self, blocks: set[int]) -> bool:
        """Whether none of these blocks is in ``blocks`` (set's test over each run, in C)."""
        return all(blocks.isdisjoint(ids[a:b]) for ids, a, b in self.runs)


@dataclass
class _Loads:
    """One step's planned loads: one mapping over every chunk, one copy per layer."""

    mapping: torch.Tensor
    bufs: list[torch.Tensor]
    refs: list  # host chunks, released once every copy is done
    blocks: "BlockRuns"  # blocks written, reported as failed if the step's loads fail
    reqs: set[str]
    tokens: int  # tokens written, counted as loaded once the step's loads succeed
    copies: list[Transfer | None]  # per layer group (parked loads: one for every layer); None: not issued
    ready: list[bool]  # per layer group: copied (CPU) or waited on by the forward's stream (GPU)
    broken: bool = False  # a copy raised

    def copied(self) -> bool:
        """Every issued copy is done (CPU copies are done when issued)."""
        return all(t is None or t.done() for t in self.copies)

    def absorb(self, other: "_Loads") -> "_Loads":
        """Take over the chunks and copies of another batch of the same parked load (whose copies
        are issued: ``mapping`` stays the first batch's, which nothing reads any more)."""
        self.bufs += other.bufs
        self.refs += other.refs
        self.blocks.runs += other.blocks.runs
        self.reqs |= other.reqs
        self.tokens += other.tokens
        self.copies += other.copies
        self.ready += other.ready
        self.broken |= other.broken
        return self


@dataclass
class _Saves:
    """One step's planned saves: host slots allocated, one copy per layer."""

    mapping: torch.Tensor
    bufs: list[torch.Tensor]
    items: list[tuple[SaveSpec, int, bytes, object]]  # (spec, chunk index, key, host ref), in buffer order
    reqs: set[str] = field(default_factory=set)  # requests whose blocks the copies read
    blocks: "BlockRuns | None" = None  # the blocks the copies read
    copies: list[Transfer] = field(default_factory=list)
    written: list[bool] = field(default_factory=list)  # per layer: its attention is done (hook ran)
    copied: list[bool] = field(default_factory=list)  # per layer group
    broken: bool = False


class KVWorker:
    def __init__(self, store, paged: PagedKV, chunk_size: int, layers_per_copy: int | None = None,
                 save_layers_per_copy: int | None = None, save_in_step: bool = False) -> None:
        """``layers_per_copy``: layers moved by one copy (default: 1 on CPU, by :data:`MIN_RUN_BYTES`
        on a GPU). ``save_layers_per_copy``: the same for saves (default: ``layers_per_copy``;
        on a GPU every layer in one copy, unless ``save_in_step``: the step waits for its saves)."""
        if chunk_size % paged.block_size:
            raise ValueError(f"chunk_size={chunk_size} is not a multiple of the cache's block size {paged.block_size}")
        self.store = store
        self.paged = paged
        self.chunk_size = chunk_size
        self.block_size = paged.block_size
        self.num_layers = paged.num_layers
        self.chunk_nbytes = paged.chunk_nbytes(chunk_size)
        self._offsets = np.arange(paged.block_size, dtype=np.int64)
        self.backend = backend_for(paged)
        # On a GPU copies are enqueued on side streams and complete later.
        self.cuda = paged.device.type == "cuda"
        if layers_per_copy is None:
            run = chunk_size * paged.width * paged.itemsize  # one chunk's K (or V) of one layer
            layers_per_copy = -(-MIN_RUN_BYTES // run) if self.cuda else 1
        g = max(1, min(int(layers_per_copy), self.num_layers))
        self.groups = _layer_groups(self.num_layers, g)
        self._group_of = [i // g for i in range(self.num_layers)]
        if save_layers_per_copy is None:
            save_layers_per_copy = self.num_layers if self.cuda and not save_in_step else g
        sg = max(1, min(int(save_layers_per_copy), self.num_layers))
        self.save_groups = _layer_groups(self.num_layers, sg)
        self._save_group_of = [i // sg for i in range(self.num_layers)]
        self._loads: _Loads | None = None  # this step's loads (the forward waits for them layer by layer)
        # Parked loads (vLLM's async-load path), each a (requests, failed blocks, loads) result:
        # inline ones for this step's get_finished; background jobs (future, specs); background
        # results whose GPU copies still run; reported loads whose GPU copies may still run.
        self._reports: list[tuple[set[str], set[int], _Loads | None]] = []
        self._jobs: list[tuple[Future, list[LoadSpec]]] = []
        self._landing: list[tuple[set[str], set[int], _Loads | None]] = []
        self._pending: list[_Loads] = []
        self._load_thread: ThreadPoolExecutor | None = None
        self._load_stream = None
        # False while the engine has unmapped the cache (vLLM's sleep mode): a parked load whose
        # fetch ends then copies nothing and is reported failed.
        self.cache_mapped = True
        self._saves: _Saves | None = None
        self._unplanned_saves: list[SaveSpec] | None = None  # this step's, until a hook plans them
        # GPU saves whose copies may still run, each committed by the save thread (its future).
        self._saving: list[tuple[_Saves, Future]] = []
        self._save_thread: ThreadPoolExecutor | None = None
        self._stats_lock = threading.Lock()  # the save and load threads count too
        self.stats = {"loaded_tokens": 0, "failed_chunks": 0, "saved_chunks": 0, "skipped_saves": 0,
                      "unready_layer_loads": 0, "fetch_us": 0,
                      "step_us": 0, "step_tokens": 0}

    # ------------------------------------------------------------------ helpers
    def _chunk_slots(self, block_ids: list[int], first: int, count: int) -> tuple[torch.Tensor, int]:
        """Slots of every token of chunks ``[first, first + count)`` (one row per chunk), -1 past
        the block table, and the token where the table's coverage ends (a parked load's table
        ends at the load's end, which may be inside its last chunk: that chunk's covered part loads).
        Built with numpy in a few calls whatever the chunk count (issue 28.2)."""
        c, bs = self.chunk_size, self.block_size
        begin = first * c
        covered = max(0, min(count * c, len(block_ids) * bs - begin))  # a multiple of bs: c is one
        slots = np.full(count * c, -1, dtype=np.int64)
        if covered:
            # array.array reads a list of ints ~1.6x faster than np.asarray (a 32K table: 2,048 ids)
            blocks = np.frombuffer(array.array("q", block_ids[begin // bs:(begin + covered) // bs]), dtype=np.int64)
            slots[:covered] = (blocks[:, None] * bs + self._offsets).reshape(-1)
        return torch.from_numpy(slots).view(count, c), begin + covered

    def _blocks_of(self, block_ids: list[int], lo: int, hi: int) -> set[int]:
        runs = BlockRuns(self.block_size)
        runs.add(block_ids, lo, hi)
        return set(runs)

    def _buf(self, ref) -> torch.Tensor:
        data = ref.data
        return data if data.shape[0] == self.chunk_nbytes else data[:self.chunk_nbytes]

    def _mapping(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """The step's slot mapping, checked against the cache; on a GPU uploaded once (every
        layer group's copy reads it), on the current stream, which the copies wait for."""
        m = parts[0] if len(parts) == 1 else torch.cat(parts)
        top = int(m.numpy().max())
        if top >= self.paged.num_slots:
            raise ValueError(f"slot {top} is past the cache's {self.paged.num_slots} slots")
        return m.pin_memory().to(self.paged.device, non_blocking=True) if self.cuda else m

    def warm_up(self) -> None:
        """Compile the copy kernels now (Triton JIT, ~1 s each) instead of in the first request's step.

        A gather and a scatter of one chunk with slot -1 everywhere, whole and per layer:
        they write nothing in the cache. No-op for the torch backend.
        """
        from kvtier.transfer import torch_ref

        if self.backend is torch_ref:
            return
        ref = self.store.allocate()
        buf = self._buf(ref) if ref is not None else torch.zeros(
            self.chunk_nbytes, dtype=torch.uint8, pin_memory=torch.cuda.is_available())
        try:
            none = torch.full((self.chunk_size,), -1, dtype=torch.int64)
            for layers in [None] + self.groups:
                gather(self.paged, none, [buf], layers=layers).wait()
                scatter(self.paged, none, [buf], layers=layers).wait()
        finally:
            if ref is not None:
                ref.release()

    # ------------------------------------------------------------------ load
    def start_load(self, specs: Iterable[LoadSpec]) -> tuple[set[int], set[str]]:
        """Plan a step's loads (fetch chunks, map slots); returns (failed block ids, their requests).

        Failures known now -- a chunk missing, corrupt or unreachable, a block table too
        short -- write nothing. On a GPU every layer's copy is enqueued here.
        """
        if self._loads is not None:  # the previous step was not finished: never keep its chunks
            log.warning("kvtier: a step's loads were not finished; finishing them now")
            self.finish_load()
        failed_blocks, failed_reqs, self._loads = self._plan_loads(specs)
        if self._loads is not None and self.cuda:
            with span("worker.enqueue_loads", chunks=len(self._loads.refs)):
                for g in range(len(self.groups)):
                    self._copy_in(self._loads, g)
        return failed_blocks, failed_reqs

    # ------------------------------------------------------------------ parked loads
    def park_load(self, specs: Iterable[LoadSpec]) -> None:
        """Load for requests the engine parked until their load finished (vLLM's async-load path).

        Never blocks the step; :meth:`finished_parked` reports each request once its load is
        done or failed. Two ways, per spec (``spec.background``, or a chunk not in host memory):

        - inline: planned now; on CPU copied now; on a GPU enqueued on side streams and
          reported at once: every later forward waits for these copies on the device
          (:meth:`before_forward`), so whatever reads the blocks once the engine heard of them
          reads the loaded KV. Failures are known now (a chunk missing, an enqueue raising).
        - background: fetched (disk, Redis, server), planned and copied by the load thread,
          off the engine's steps; reported once every copy is done.
        """
        inline, background = [], []
        lower = bool(getattr(self.store, "lower", None))  # this process's store has tiers below its cpu tier
        reads = False  # a chunk is read from such a tier: batches overlap reads and copies
        for spec in specs:
            held = self._in_memory(spec.keys)
            if spec.background or not held:
                background.append(spec)
                reads |= lower and not held
            else:
                inline.append(spec)
        if inline:
            self._reports.append(self._run_parked(inline))
        if background:
            after = None
            if self.cuda:  # the copies start after the work queued so far (as an inline copy would)
                after = torch.cuda.Event()
                after.record(torch.cuda.current_stream(self.paged.device))
            if self._load_thread is None:
                self._load_thread = ThreadPoolExecutor(1, thread_name_prefix="kvtier-load")
            self._jobs.append((self._load_thread.submit(self._run_parked, background, after, reads), background))

    def _in_memory(self, keys: list[bytes]) -> bool:
        cpu = getattr(self.store, "cpu", None)
        return cpu is not None and all(cpu.contains(keys))

    def _run_parked(self, specs: list[LoadSpec], after=None,
                    batched: bool = False) -> tuple[set[str], set[int], _Loads | None]:
        """Plan and copy (GPU: enqueue) parked loads; returns (requests, failed blocks, loads in flight).
        ``batched``: fetched and copied :data:`PARKED_BATCH_BYTES` at a time (the load thread's way
        when chunks are read from the store's lower tiers; a `kvtier serve` store maps them)."""
        failed_blocks: set[int] = set()
        ld = None
        with (torch.cuda.device(self.paged.device) if self.cuda else nullcontext()), \
                (torch.cuda.stream(self._side_stream(after)) if after is not None else nullcontext()):
            for batch in self._batches(specs) if batched else [specs]:
                failed, _, part = self._plan_loads(batch)
                failed_blocks |= failed
                if part is not None and not self.cache_mapped:
                    failed_blocks |= self._release(part, ok=False)
                    part = None
                if part is not None:
                    with span("worker.enqueue_loads", chunks=len(part.refs)):
                        self._copy_in(part, None)
                    ld = part if ld is None else ld.absorb(part)
        return {s.req_id for s in specs}, failed_blocks, ld

    def _batches(self, specs: list[LoadSpec]) -> list[list[LoadSpec]]:
        """``specs`` cut into batches of at most :data:`PARKED_BATCH_BYTES` of chunks; a spec longer
        than that becomes several, each over its own chunks and tokens (the same chunks, slots and
        failures as the whole: a load is planned chunk by chunk)."""
        per = max(1, PARKED_BATCH_BYTES // self.chunk_nbytes)
        c = self.chunk_size
        batches: list[list[LoadSpec]] = []
        batch: list[LoadSpec] = []
        n = 0
        for spec in specs:
            pieces = [spec] if len(spec.keys) <= per else [
                replace(spec, start=max(spec.start, (spec.first_chunk + i) * c),
                        end=min(spec.end, (spec.first_chunk + i + per) * c),
                        first_chunk=spec.first_chunk + i, keys=spec.keys[i:i + per])
                for i in range(0, len(spec.keys), per)]
            for piece in pieces:
                if batch and n + len(piece.keys) > per:
                    batches.append(batch)
                    batch, n = [], 0
                batch.append(piece)
                n += len(piece.keys)
        if batch:
            batches.append(batch)
        return batches

    def _side_stream(self, after):
        if self._load_stream is None:
            self._load_stream = torch.cuda.Stream(self.paged.device)
        self._load_stream.wait_event(after)
        return self._load_stream

    def finished_parked(self) -> tuple[set[str], set[int]]:
        """Requests whose parked load is done, and the block ids that failed to load (non-blocking)."""
        reports, self._reports = self._reports, []  # inline: reported in the step that issued them
        running = []
        for fut, specs in self._jobs:
            if not fut.done():
                running.append((fut, specs))
                continue
            try:
                self._landing.append(fut.result())
            except Exception:  # a bug in the load thread: recompute, never crash
                log.exception("kvtier: a background load raised; reporting it failed")
                blocks = set().union(*(self._blocks_of(s.block_ids, s.start, s.end) for s in specs))
                self._landing.append(({s.req_id for s in specs}, blocks, None))
        self._jobs = running
        landing = []  # background: reported once its copies are done
        for result in self._landing:
            (reports if result[2] is None or result[2].copied() else landing).append(result)
        self._landing = landing
        done: set[str] = set()
        failed: set[int] = set()
        for reqs, blocks, ld in reports:
            done |= reqs
            failed |= blocks
            if ld is None:
                pass
            elif ld.broken:
                failed |= self._release(ld, ok=False)
            else:
                self._count("loaded_tokens", ld.tokens)
                self._pending.append(ld)  # its chunks are released once its copies are done
        self._release_copied()
        return done, failed

    def _release(self, ld: _Loads, ok: bool) -> set[int]:
        """Release a load's host chunks and count it; returns its blocks if it failed."""
        for ref in ld.refs:
            ref.release()
        if ok:
            self._count("loaded_tokens", ld.tokens)
            return set()
        self._count("failed_chunks", len(ld.refs))
        self.store.metrics.load_errors.inc()
        return set(ld.blocks)

    def _release_copied(self) -> list[_Loads]:
        """Release the chunks of reported parked loads whose copies are done; the others stay."""
        keep = []
        for ld in self._pending:
            if ld.copied():
                for ref in ld.refs:
                    ref.release()
            else:
                keep.append(ld)
        self._pending = keep
        return keep

    def before_forward(self) -> None:
        """Before a forward (GPU): it waits, on the device, for reported parked loads still copying."""
        if not self._pending:
            return
        stream = torch.cuda.current_stream(self.paged.device)
        for ld in self._release_copied():
            for t in ld.copies:
                if t is not None:
                    t.wait_on(stream)

    def drain_parked(self, timeout: float = 60.0) -> None:
        """Wait for background loads (tests, vLLM's sleep); they are reported by :meth:`finished_parked`."""
        deadline = time.monotonic() + timeout
        for fut, _ in list(self._jobs):
            fut.result(timeout=max(0.0, deadline - time.monotonic()))
        for ld in self._pending + [r[2] for r in self._landing if r[2] is not None]:
            for t in ld.copies:
                if t is not None:
                    t.wait()

    def _plan_loads(self, specs: Iterable[LoadSpec]) -> tuple[set[int], set[str], _Loads | None]:
        """Fetch chunks and map slots; returns (failed block ids, their requests, the loads to copy)."""
        with span("worker.plan_loads"):
            return self._plan_loads_now(specs)

    def _plan_loads_now(self, specs: Iterable[LoadSpec]) -> tuple[set[int], set[str], _Loads | None]:
        failed_blocks: set[int] = set()
        failed_reqs: set[str] = set()
        c = self.chunk_size

        def fail(spec: LoadSpec, ranges: Iterable[tuple[int, int]], chunks: int = 0) -> None:
            """Report the blocks of token ranges ``ranges`` of ``spec`` as not loaded."""
            for lo, hi in ranges:
                failed_blocks.update(self._blocks_of(spec.block_ids, lo, hi))
            failed_reqs.add(spec.req_id)
            self._count("failed_chunks", chunks)
            self.store.metrics.load_errors.inc()

        refs: list = []
        parts: list[torch.Tensor] = []
        blocks = BlockRuns(self.block_size)
        reqs: set[str] = set()
        tokens = 0
        for spec in specs:
            if not spec.keys:
                fail(spec, [(spec.start, spec.end)])
                continue
            t_fetch = time.perf_counter()
            try:
                got = self.store.get(spec.keys)
            except Exception:  # the store should not raise; if it does, it is a miss
                log.exception("kvtier: store.get raised; treating the load as failed")
                got = [None] * len(spec.keys)
            self._count("fetch_us", int((time.perf_counter() - t_fetch) * 1e6))
            n = len(got)
            slots, covered_end = self._chunk_slots(spec.block_ids, spec.first_chunk, n)
            # Slots of tokens outside [start, end) are -1: below start the blocks may be shared.
            base0 = spec.first_chunk * c
            flat = slots.view(-1)
            flat[:max(0, min(n * c, spec.start - base0))] = -1
            flat[max(0, spec.end - base0):] = -1
            lo, hi = max(spec.start, base0), min(spec.end, base0 + n * c)
            if hi <= covered_end and None not in got:  # the rule: every chunk found, all covered
                i0, i1 = (lo - base0) // c, -(-(hi - base0) // c)  # chunks with tokens in [lo, hi)
                for ref in got[:i0] + got[i1:]:
                    ref.release()
                if i1 > i0:
                    refs += got[i0:i1]
                    blocks.add(spec.block_ids, lo, hi)
                    tokens += hi - lo
                    reqs.add(spec.req_id)
                    parts.append(flat if i1 - i0 == n else slots[i0:i1].reshape(-1))
                continue
            rows: list[int] = []
            for i, ref in enumerate(got):
                base = base0 + i * c
                lo, hi = max(spec.start, base), min(spec.end, base + c)
                if hi <= lo:
                    if ref is not None:
                        ref.release()
                    continue
                if ref is None:
                    fail(spec, [(lo, hi)], chunks=1)
                    continue
                if hi > covered_end:  # block table too short: a planning bug, never a crash
                    log.error("kvtier: no slots for %s tokens [%d, %d) (%d blocks); reporting them failed",
                              spec.req_id, lo, hi, len(spec.block_ids))
                    ref.release()
                    fail(spec, [(lo, hi)], chunks=1)
                    continue
                refs.append(ref)
                rows.append(i)
                blocks.add(spec.block_ids, lo, hi)
                tokens += hi - lo
            if rows:
                reqs.add(spec.req_id)
                parts.append(flat if len(rows) == n else slots[rows].view(-1))
        if refs:
            n = len(self.groups)
            try:
                mapping = self._mapping(parts)
            except Exception:  # a planning bug (block ids past the cache): recompute, never crash
                log.exception("kvtier: the step's loads have no valid slot mapping; reporting them failed")
                for ref in refs:
                    ref.release()
                self._count("failed_chunks", len(refs))
                self.store.metrics.load_errors.inc()
                return failed_blocks | set(blocks), failed_reqs | reqs, None
            return failed_blocks, failed_reqs, _Loads(mapping, [self._buf(r) for r in refs], refs, blocks, reqs,
                                                      tokens, [None] * n, [False] * n)
        return failed_blocks, failed_reqs, None

    def _copy_in(self, ld: _Loads, group: int | None) -> None:
        """Copy (CPU) or enqueue (GPU) layer group ``group`` of ``ld``; None: every layer in one
        copy, for parked loads, which no forward reads layer by layer (on a GPU a whole 32 MiB
        chunk is one DMA: 8x fewer host calls than by groups, all of them on the engine's GIL)."""
        layers = None if group is None else self.groups[group]
        try:
            t = scatter(self.paged, ld.mapping, ld.bufs, layers=layers)
        except Exception:
            log.exception("kvtier: loading layers %s of %d chunks failed; the step's loads will be "
                          "reported failed", layers or "(all)", len(ld.bufs))
            ld.broken = True
            return
        if group is None:
            ld.copies = [t]
        else:
            ld.copies[group] = t

    def load_layer(self, layer: int) -> None:
        """Before layer ``layer``'s attention reads the cache: its loaded KV is in place.

        CPU: copies its layer group now. GPU: the current (forward) stream waits for
        the group's copy, without blocking the host. No-op when the step loads nothing.
        """
        if self._pending:  # belt and braces: before_forward ran at the step's start
            self.before_forward()
        ld = self._loads
        g = self._group_of[layer]
        if ld is None or ld.ready[g]:
            return
        if not self.cuda:
            self._copy_in(ld, g)
        t = ld.copies[g]
        if t is not None and self.cuda:
            t.wait_on(torch.cuda.current_stream(self.paged.device))
        ld.ready[g] = True

    def finish_load(self) -> tuple[set[int], set[str]]:
        """After the forward: release the step's host chunks; returns (failed block ids, requests).

        Nothing fails unless a copy raised or a layer was never made ready by
        :meth:`load_layer` before the forward ended; then every load of the step is
        reported, since its attention may have read the cache before the copy.
        """
        ld, self._loads = self._loads, None
        if ld is None:
            return set(), set()
        with span("worker.wait_loads", chunks=len(ld.refs)):
            for t in ld.copies:
                if t is not None:
                    t.wait()
        unready = [self.groups[i] for i, ok in enumerate(ld.ready) if not ok]
        if unready:
            self._count("unready_layer_loads", 1)
            log.warning("kvtier: layer groups %s were not waited for before their attention (no "
                        "wait_for_layer_load); reporting the step's loads failed so they are recomputed",
                        unready[:8])
        ok = not ld.broken and not unready
        return self._release(ld, ok), set() if ok else set(ld.reqs)

    def load(self, specs: Iterable[LoadSpec]) -> tuple[set[int], set[str]]:
        """All layers at once (tools, tests): :meth:`start_load`, every layer, :meth:`finish_load`."""
        blocks, reqs = self.start_load(specs)
        for layer in range(self.num_layers):
            self.load_layer(layer)
        b2, r2 = self.finish_load()
        return blocks | b2, reqs | r2

    # ------------------------------------------------------------------ save
    def start_save(self, specs: Iterable[SaveSpec]) -> None:
        """Take a step's saves; they are planned (a host slot per chunk, a full pool skipping the
        chunk, one mapping) at the first layer's hook or at :meth:`finish_save`, whichever comes
        first. Not here: this runs at the step's start, while the GPU waits for the forward's first
        launch, and on an H100 planning an 8K-token save took 0.5 ms of it; by the first layer's
        hook the GPU has that layer to compute."""
        if self._saves is not None or self._unplanned_saves is not None:
            log.warning("kvtier: a step's saves were not finished; dropping them")
            self._drop_saves()
        self._unplanned_saves = list(specs)

    def _planned_saves(self) -> _Saves | None:
        """The step's saves, planned now if they are not yet."""
        specs, self._unplanned_saves = self._unplanned_saves, None
        if specs is not None:
            with span("worker.plan_saves"):
                self._plan_saves(specs)
        return self._saves

    def _plan_saves(self, specs: Iterable[SaveSpec]) -> None:
        items, parts = [], []
        for spec in specs:
            if not spec.chunk_indices:
                continue
            lo_ci = min(spec.chunk_indices)
            slots, covered_end = self._chunk_slots(spec.block_ids, lo_ci, max(spec.chunk_indices) + 1 - lo_ci)
            wanted = [(ci, key) for ci, key in zip(spec.chunk_indices, spec.keys)
                      if (ci + 1) * self.chunk_size <= covered_end]
            if len(wanted) < len(spec.keys):  # table too short (a planning bug): never a crash
                log.error("kvtier: no slots for %d chunks of %s (%d blocks); not saved",
                          len(spec.keys) - len(wanted), spec.req_id, len(spec.block_ids))
                self._count("skipped_saves", len(spec.keys) - len(wanted))
            got = self.store.allocate_many(len(wanted))
            self._count("skipped_saves", len(wanted) - len(got))
            rows: list[int] = []
            for (ci, key), ref in zip(wanted, got):
                items.append((spec, ci, key, ref))
                rows.append(ci - lo_ci)
            if rows:
                whole = len(rows) == slots.shape[0]  # every chunk of the range: no row selection
                parts.append(slots.view(-1) if whole else slots[rows].view(-1))
        if items:
            try:
                mapping = self._mapping(parts)
            except Exception:
                log.exception("kvtier: the step's saves have no valid slot mapping; not saved")
                for *_, ref in items:
                    ref.release()
                self._count("skipped_saves", len(items))
                return
            self._saves = _Saves(mapping, [self._buf(r) for *_, r in items], items,
                                 reqs={spec.req_id for spec, *_ in items},
                                 blocks=self._save_blocks(items),
                                 written=[False] * self.num_layers, copied=[False] * len(self.save_groups))

    def _save_blocks(self, items: list) -> BlockRuns:
        """The blocks the planned saves read (fence_saves tests them against fresh blocks): one
        run per request's consecutive chunks, so a 32K prompt's 128 chunks make one run."""
        runs = BlockRuns(self.block_size)
        c = self.chunk_size
        spec = first = end = None
        for s, ci, *_ in items:
            if s is spec and ci == end:
                end += 1
                continue
            if spec is not None:
                runs.add(spec.block_ids, first * c, end * c)
            spec, first, end = s, ci, ci + 1
        if spec is not None:
            runs.add(spec.block_ids, first * c, end * c)
        return runs

    def save_layer(self, layer: int) -> None:
        """After layer ``layer``'s attention wrote the step's KV: once every layer of its save
        group has, copy the group out (GPU: enqueued behind the forward's work so far)."""
        sv = self._planned_saves()
        if sv is None:
            return
        sv.written[layer] = True
        g = self._save_group_of[layer]
        lo, hi = self.save_groups[g]
        if not sv.copied[g] and all(sv.written[lo:hi]):
            self._copy_out(g)

    def _copy_out(self, group: int) -> None:
        sv = self._saves
        sv.copied[group] = True
        try:
            sv.copies.append(gather(self.paged, sv.mapping, sv.bufs, layers=self.save_groups[group]))
        except Exception:
            log.exception("kvtier: saving layers %s of %d chunks failed; the step saves nothing",
                          self.save_groups[group], len(sv.bufs))
            sv.broken = True

    def finish_save(self, skip_reqs: set[str] = frozenset(), failed_blocks: set[int] = frozenset()) -> None:
        """Copy layers not saved yet and decide which chunks to commit; commit them once copied.

        Not committed: chunks of requests in ``skip_reqs`` (a load of theirs failed this
        step), and chunks whose prefix holds a block of ``failed_blocks`` (this step's failed
        loads: a request admitted in the same step may share those blocks through the
        prefix cache and have computed on them). Later steps are planned after the engine
        learned of the failure, as long as no step is in flight when a load fails: the
        connector parks loads under async scheduling (docs/vllm.md).

        CPU: the copies are done; the chunks are committed now. GPU: the step does not wait;
        the save thread commits them when their copies are done (:meth:`fence_saves`).
        """
        sv = self._planned_saves()
        if sv is None:
            return
        for g, done in enumerate(sv.copied):
            if not done:  # a hook of its layers did not run; the blocks are still the request's
                self._copy_out(g)
        self._saves = None
        bs = self.block_size
        keep = []
        for item in sv.items:
            spec, ci, _, ref = item
            end = (ci + 1) * self.chunk_size
            if (sv.broken or spec.req_id in skip_reqs
                    or (failed_blocks and not failed_blocks.isdisjoint(spec.block_ids[:end // bs]))):
                ref.release()
                self._count("skipped_saves", 1)
            else:
                keep.append(item)
        sv.items = keep
        if not self.cuda:
            self._commit(sv)
            return
        if self._save_thread is None:
            self._save_thread = ThreadPoolExecutor(1, thread_name_prefix="kvtier-save")
        self._saving.append((sv, self._save_thread.submit(self._commit, sv)))

    def _commit(self, sv: _Saves) -> None:
        """Wait for a step's save copies (the save thread, on a GPU), then commit its chunks."""
        try:
            with span("worker.wait_saves", chunks=len(sv.items)):
                for t in sv.copies:
                    t.wait()
        except Exception:
            log.exception("kvtier: waiting for a save failed; the step saves nothing")
            sv.broken = True
        for _, _, key, ref in sv.items:
            if sv.broken:
                ref.release()
            else:
                self.store.commit(key, ref)
        self._count("skipped_saves" if sv.broken else "saved_chunks", len(sv.items))

    def _count(self, name: str, n: int) -> None:
        with self._stats_lock:
            self.stats[name] += n

    def fence_saves(self, kept: Container[str] | None = None, fresh: Container[int] | None = None) -> None:
        """Before a step writes the cache: wait for the saves whose blocks it may write.

        A save's copies read blocks of its requests, which stay theirs while the engine keeps
        the requests; a request finished, preempted or resumed (with new blocks) may have had
        its blocks freed and handed to another request, which this step may write (vLLM
        zeroes or copies new blocks, kvtier or another connector loads them, the forward).
        So a save still copying is waited for, on the host, before this returns when:

        - ``fresh`` (the blocks handed to requests in this step) holds one of its blocks; or,
          where ``fresh`` is None (not known: another connector may allocate unseen),
        - one of its requests is not in ``kept`` (the step's requests that keep their blocks;
          None: none do).

        The connector calls this from vLLM's ``handle_preemptions``, the first thing of a step,
        and again when the step's metadata is bound.
        """
        if not self._saving:
            return
        still = []
        for sv, fut in self._saving:
            if fut.done():
                reused = True
            elif fresh is not None:
                reused = not sv.blocks.isdisjoint(fresh if isinstance(fresh, (set, frozenset)) else set(fresh))
            else:
                reused = kept is None or not sv.reqs <= kept
            if not reused:
                still.append((sv, fut))
                continue
            with span("worker.fence_saves", chunks=len(sv.items)) if not fut.done() else nullcontext():
                try:
                    fut.result()
                except Exception:  # _commit catches the copies' errors; a commit raising is a bug
                    log.exception("kvtier: committing a step's saves raised")
        self._saving = still

    def drain_saves(self) -> None:
        """Wait until every save is committed (tools, tests, shutdown)."""
        self.fence_saves(None, None)

    def _drop_saves(self) -> None:
        sv, self._saves, self._unplanned_saves = self._saves, None, None
        if sv is None:
            return
        for t in sv.copies:
            t.wait()
        for *_, ref in sv.items:
            ref.release()

    def save(self, specs: Iterable[SaveSpec], skip_reqs: set[str] = frozenset()) -> None:
        """All layers at once, committed on return (tools, tests): :meth:`start_save`,
        :meth:`finish_save`, :meth:`drain_saves`."""
        self.start_save(specs)
        self.finish_save(skip_reqs)
        self.drain_saves()
