"""Worker side: execute a step's loads and saves against the paged KV cache.

Engine-agnostic: the cache is a :class:`kvtier.transfer.PagedKV` (built by the
connector from vLLM's ``register_kv_caches``), and every copy goes through
:func:`kvtier.transfer.scatter` / :func:`~kvtier.transfer.gather` -- the torch
reference on CPU, the Triton kernels on a CUDA GPU. One call per request moves
all of its chunks; the slot mapping says which token goes where (-1: not written).

- :meth:`KVWorker.load` runs before the forward pass, all layers at once. A load
  writes only the slots of tokens in ``[start, end)``: a chunk that begins below
  ``start`` is read whole but its lower tokens are not written (slot -1 and
  ``skip_prefix_n_tokens``), so blocks below ``start`` -- possibly shared through
  prefix caching with running requests -- are never touched. A chunk that cannot
  be had (evicted, corrupt, tier down) writes nothing and its blocks are returned
  as failed, for the engine to recompute. On a GPU the forward's stream is made to
  wait on the copy (``Transfer.wait_on``), without blocking the host; the host
  chunk references are released once the copy is done.
- :meth:`KVWorker.save` runs after the forward pass, before the step returns, so
  the blocks are still the request's: it copies each chunk out of the paged cache
  into a host slot, waits for the copy, and commits it; writing to lower tiers
  happens later, from host memory only.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch

from kvtier.transfer import PagedKV, Transfer, backend_for, gather, scatter
from kvtier.vllm.scheduler import LoadSpec, SaveSpec

log = logging.getLogger(__name__)


class KVWorker:
    def __init__(self, store, paged: PagedKV, chunk_size: int) -> None:
        if chunk_size % paged.block_size:
            raise ValueError(f"chunk_size={chunk_size} is not a multiple of the cache's block size {paged.block_size}")
        self.store = store
        self.paged = paged
        self.chunk_size = chunk_size
        self.block_size = paged.block_size
        self.chunk_nbytes = paged.chunk_nbytes(chunk_size)
        self.backend = backend_for(paged)
        # Loads whose host chunks must outlive the (GPU) copy: (transfer, refs).
        self._in_flight: list[tuple[Transfer, list]] = []
        self.stats = {"loaded_tokens": 0, "failed_chunks": 0, "saved_chunks": 0, "skipped_saves": 0}

    # ------------------------------------------------------------------ helpers
    def _slots(self, block_ids: list[int], lo: int, hi: int) -> torch.Tensor:
        t = torch.arange(lo, hi, dtype=torch.int64)
        blocks = torch.as_tensor(block_ids, dtype=torch.int64)
        return blocks[t // self.block_size] * self.block_size + t % self.block_size

    def _blocks_of(self, block_ids: list[int], lo: int, hi: int) -> set[int]:
        if hi <= lo:
            return set()
        bs = self.block_size
        return set(block_ids[lo // bs:(hi - 1) // bs + 1])

    def _buf(self, ref) -> torch.Tensor:
        return ref.data[:self.chunk_nbytes]

    def _reap(self, block: bool = False) -> None:
        """Release the host chunks of loads whose copy is done (all of them, waiting, if ``block``)."""
        keep = []
        for t, refs in self._in_flight:
            if block:
                t.wait()
            if block or t.done():
                for ref in refs:
                    ref.release()
            else:
                keep.append((t, refs))
        self._in_flight = keep

    def finish_step(self) -> None:
        """End of a step (after the forward): release the host chunks of this step's loads."""
        self._reap(block=True)  # the forward was enqueued after every load's copy: they are done

    def warm_up(self) -> None:
        """Compile the copy kernels now (Triton JIT, ~1 s each) instead of in the first request's step.

        A gather and a scatter of one chunk with slot -1 everywhere: they write nothing
        in the cache. No-op for the torch backend.
        """
        from kvtier.transfer import torch_ref

        if self.backend is torch_ref:
            return
        ref = self.store.allocate()
        buf = self._buf(ref) if ref is not None else torch.zeros(
            self.chunk_nbytes, dtype=torch.uint8, pin_memory=torch.cuda.is_available())
        try:
            none = torch.full((self.chunk_size,), -1, dtype=torch.int64)
            gather(self.paged, none, [buf]).wait()
            scatter(self.paged, none, [buf]).wait()
        finally:
            if ref is not None:
                ref.release()

    # ------------------------------------------------------------------ load
    def load(self, specs: Iterable[LoadSpec]) -> tuple[set[int], set[str]]:
        """Run loads; returns (block ids that failed, request ids with a failure)."""
        self._reap()
        failed_blocks: set[int] = set()
        failed_reqs: set[str] = set()
        c = self.chunk_size
        cuda = self.paged.device.type == "cuda"

        def fail(spec: LoadSpec, ranges: Iterable[tuple[int, int]], chunks: int = 0) -> None:
            """Report the blocks of token ranges ``ranges`` of ``spec`` as not loaded."""
            for lo, hi in ranges:
                failed_blocks.update(self._blocks_of(spec.block_ids, lo, hi))
            failed_reqs.add(spec.req_id)
            self.stats["failed_chunks"] += chunks
            self.store.metrics.load_errors.inc()

        for spec in specs:
            if not spec.keys:
                fail(spec, [(spec.start, spec.end)])
                continue
            try:
                refs = self.store.get(spec.keys)
            except Exception:  # the store should not raise; if it does, it is a miss
                log.exception("kvtier: store.get raised; treating the load as failed")
                refs = [None] * len(spec.keys)
            # One scatter for every chunk we have: chunk k of the call is `used[k]`, its
            # mapping holds the slots of its tokens in [start, end) and -1 elsewhere.
            used: list = []
            parts: list[torch.Tensor] = []
            skip = 0
            tokens = 0
            ranges: list[tuple[int, int]] = []
            for i, ref in enumerate(refs):
                base = (spec.first_chunk + i) * c
                lo, hi = max(spec.start, base), min(spec.end, base + c)
                if hi <= lo:
                    if ref is not None:
                        ref.release()
                    continue
                if ref is None:
                    fail(spec, [(lo, hi)], chunks=1)
                    continue
                m = torch.full((c,), -1, dtype=torch.int64)
                try:
                    m[lo - base:hi - base] = self._slots(spec.block_ids, lo, hi)
                except Exception:  # block table too short: a planning bug, never a crash
                    log.exception("kvtier: no slots for %s tokens [%d, %d); reporting them failed",
                                  spec.req_id, lo, hi)
                    ref.release()
                    fail(spec, [(lo, hi)])
                    continue
                if not used:
                    skip = lo - base  # a load starting mid-chunk: tokens below start are not written
                used.append(ref)
                parts.append(m)
                ranges.append((lo, hi))
                tokens += hi - lo
            if not used:
                continue
            try:
                t = scatter(self.paged, torch.cat(parts), [self._buf(r) for r in used], skip)
            except Exception:
                log.exception("kvtier: loading %d chunks of %s failed; reporting them failed", len(used), spec.req_id)
                for ref in used:
                    ref.release()
                fail(spec, ranges, chunks=len(used))
                continue
            if cuda:
                t.wait_on(torch.cuda.current_stream(self.paged.device))  # the forward reads after the copy
            self._in_flight.append((t, used))
            self.stats["loaded_tokens"] += tokens
        self._reap()
        return failed_blocks, failed_reqs

    # ------------------------------------------------------------------ save
    def save(self, specs: Iterable[SaveSpec], skip_reqs: set[str] = frozenset()) -> None:
        """Copy each planned chunk out of the paged cache and commit it to the store.

        Requests in ``skip_reqs`` (a load of theirs failed this step, so KV computed
        on top of it is wrong) save nothing. A full host pool skips the save.
        """
        self.finish_step()
        c = self.chunk_size
        for spec in specs:
            if spec.req_id in skip_reqs:
                self.stats["skipped_saves"] += len(spec.keys)
                continue
            refs, keys, parts = [], [], []
            for ci, key in zip(spec.chunk_indices, spec.keys):
                ref = self.store.allocate()
                if ref is None:
                    self.stats["skipped_saves"] += 1
                    continue
                refs.append(ref)
                keys.append(key)
                parts.append((ci * c, (ci + 1) * c))
            if not refs:
                continue
            try:
                mapping = torch.cat([self._slots(spec.block_ids, lo, hi) for lo, hi in parts])
                # Waited for here: the engine may reuse the blocks once the step returns.
                gather(self.paged, mapping, [self._buf(r) for r in refs]).wait()
            except Exception:
                for ref in refs:
                    ref.release()
                log.exception("kvtier: saving %d chunks of %s failed; skipped", len(refs), spec.req_id)
                continue
            for key, ref in zip(keys, refs):
                self.store.commit(key, ref)
                self.stats["saved_chunks"] += 1
