"""Worker side: execute a step's loads and saves against the paged KV cache.

Engine-agnostic apart from :class:`~kvtier.vllm.paged_io.PagedLayers`, which
describes the cache tensors. Both calls are synchronous:

- :meth:`KVWorker.load` runs before the forward pass, all layers at once (so the
  engine's per-layer wait hook has nothing to wait for). A load writes only the
  slots of tokens in ``[start, end)``: a chunk that begins below ``start`` is read
  whole but its lower tokens are not written, so blocks below ``start`` — possibly
  shared through prefix caching with running requests — are never touched. A chunk
  that cannot be had (evicted, corrupt, tier down) writes nothing and its blocks
  are returned as failed, for the engine to recompute.
- :meth:`KVWorker.save` runs after the forward pass, before the step returns, so
  the blocks are still the request's: it copies each chunk out of the paged cache
  into a host slot and commits it; writing to lower tiers happens later, from
  host memory only.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch

from kvtier.vllm.paged_io import PagedLayers
from kvtier.vllm.scheduler import LoadSpec, SaveSpec

log = logging.getLogger(__name__)


class KVWorker:
    def __init__(self, store, paged: PagedLayers, chunk_size: int) -> None:
        self.store = store
        self.paged = paged
        self.chunk_size = chunk_size
        self.block_size = paged.block_size
        self.stats = {"loaded_tokens": 0, "failed_chunks": 0, "saved_chunks": 0, "skipped_saves": 0}

    def _slots(self, block_ids: list[int], lo: int, hi: int) -> torch.Tensor:
        t = torch.arange(lo, hi, dtype=torch.int64)
        blocks = torch.as_tensor(block_ids, dtype=torch.int64)
        return blocks[t // self.block_size] * self.block_size + t % self.block_size

    def _blocks_of(self, block_ids: list[int], lo: int, hi: int) -> set[int]:
        if hi <= lo:
            return set()
        bs = self.block_size
        return set(block_ids[lo // bs:(hi - 1) // bs + 1])

    # ------------------------------------------------------------------ load
    def load(self, specs: Iterable[LoadSpec]) -> tuple[set[int], set[str]]:
        """Run loads; returns (block ids that failed, request ids with a failure)."""
        failed_blocks: set[int] = set()
        failed_reqs: set[str] = set()
        c = self.chunk_size
        for spec in specs:
            if not spec.keys:
                failed_blocks |= self._blocks_of(spec.block_ids, spec.start, spec.end)
                failed_reqs.add(spec.req_id)
                self.store.metrics.load_errors.inc()
                continue
            try:
                refs = self.store.get(spec.keys)
            except Exception:  # the store should not raise; if it does, it is a miss
                log.exception("kvtier: store.get raised; treating the load as failed")
                refs = [None] * len(spec.keys)
            try:
                for i, ref in enumerate(refs):
                    base = (spec.first_chunk + i) * c
                    lo, hi = max(spec.start, base), min(spec.end, base + c)
                    if hi <= lo:
                        continue
                    if ref is None:
                        failed_blocks |= self._blocks_of(spec.block_ids, lo, hi)
                        failed_reqs.add(spec.req_id)
                        self.stats["failed_chunks"] += 1
                        self.store.metrics.load_errors.inc()
                        continue
                    chunk = self.paged.chunk_view(ref.data, c)
                    idx = torch.arange(lo - base, hi - base, dtype=torch.int64)
                    self.paged.scatter(chunk, idx, self._slots(spec.block_ids, lo, hi))
                    self.stats["loaded_tokens"] += hi - lo
            finally:
                for ref in refs:
                    if ref is not None:
                        ref.release()
        return failed_blocks, failed_reqs

    # ------------------------------------------------------------------ save
    def save(self, specs: Iterable[SaveSpec], skip_reqs: set[str] = frozenset()) -> None:
        """Copy each planned chunk out of the paged cache and commit it to the store.

        Requests in ``skip_reqs`` (a load of theirs failed this step, so KV computed
        on top of it is wrong) save nothing. A full host pool skips the save.
        """
        c = self.chunk_size
        idx = torch.arange(c, dtype=torch.int64)
        for spec in specs:
            if spec.req_id in skip_reqs:
                self.stats["skipped_saves"] += len(spec.keys)
                continue
            for ci, key in zip(spec.chunk_indices, spec.keys):
                ref = self.store.allocate()
                if ref is None:
                    self.stats["skipped_saves"] += 1
                    continue
                try:
                    chunk = self.paged.chunk_view(ref.data, c)
                    self.paged.gather(chunk, idx, self._slots(spec.block_ids, ci * c, (ci + 1) * c))
                except Exception:
                    ref.release()
                    log.exception("kvtier: saving a chunk of %s failed; skipped", spec.req_id)
                    continue
                self.store.commit(key, ref)
                self.stats["saved_chunks"] += 1
