"""Vectorised torch implementation of gather/scatter (any device; used on CPU).

It is what CPU engines use and the oracle the Triton kernels are tested
against. Each layer is seen as a flat ``[units, S]`` array of pieces
(``S = piece_size``: the whole row W for contiguous-row layouts, one head's D
for vLLM's ``cpu`` layout), so a token row is ``num_pieces`` unit indices and a
chunk is moved with one ``index_select`` / ``index_copy_`` per (chunk, layer,
K/V): whole pieces, no per-token Python. Strides that are not whole pieces
(padded rows) fall back to advanced indexing on a 5-D strided view.
Data moves as same-size integers, so fp8 works wherever int8 does.

With the cache and the chunks in host memory the same indexing runs in numpy on views of
the same memory (one thread, GIL released), so a CPU engine's loads and saves do not depend
on torch's thread pool (see :mod:`kvtier.hostcopy`); where a block's token rows are one run
of memory and a chunk covers whole blocks in order, one run moves per block.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from numpy.lib.stride_tricks import as_strided

from kvtier.hostcopy import host_array

from .paged import PagedKV, Transfer, check_args, check_slots_host, chunk_view, int_view, layer_range


def _flat_units(paged: PagedKV, layer: int) -> torch.Tensor | None:
    """Layer as an integer ``[units, S]`` view, or None when a stride is not a whole piece."""
    s = paged.piece_size
    strides = (paged.block_stride, paged.kv_stride, paged.token_stride, paged.piece_stride)
    if any(x % s for x in strides):
        return None
    t = int_view(paged.layers[layer])
    span = ((paged.num_blocks - 1) * paged.block_stride + (paged.num_kv - 1) * paged.kv_stride
            + (paged.block_size - 1) * paged.token_stride + (paged.num_pieces - 1) * paged.piece_stride)
    return t.as_strided((span // s + 1, s), (s, 1))


class _Plan:
    """Per chunk: token positions it moves (None = all T), and their block and offset."""

    def __init__(self, paged: PagedKV, slot_mapping: torch.Tensor, n_chunks: int, tokens: int, skip: int):
        n = n_chunks * tokens
        m = slot_mapping[:n].to("cpu", torch.int64)
        valid = m >= 0
        valid[:skip] = False
        check_slots_host(paged, m[valid])
        dev = paged.device
        self.items: list[tuple[int, torch.Tensor | None, torch.Tensor, torch.Tensor]] = []
        for c in range(n_chunks):
            sl = slice(c * tokens, (c + 1) * tokens)
            v, mc = valid[sl], m[sl]
            if bool(v.all()):
                pos = None
            else:
                pos = v.nonzero().squeeze(1)
                if pos.numel() == 0:
                    continue
                mc = mc[pos]
                pos = pos.to(dev)
            mc = mc.to(dev)
            blk = torch.div(mc, paged.block_size, rounding_mode="floor")
            self.items.append((c, pos, blk, mc - blk * paged.block_size))
        self._units: dict[tuple[int, int], torch.Tensor] = {}

    def units(self, paged: PagedKV, i: int, kv: int) -> torch.Tensor:
        """Flat unit indices of item ``i``'s rows for K (``kv=0``) or V: ``[n * num_pieces]``,
        the pieces of each row in order. Computed once per plan (every layer uses them)."""
        u = self._units.get((i, kv))
        if u is None:
            _, _, blk, off = self.items[i]
            s = paged.piece_size
            first = (blk * paged.block_stride + off * paged.token_stride + kv * paged.kv_stride) // s
            pieces = torch.arange(paged.num_pieces, device=blk.device) * (paged.piece_stride // s)
            u = self._units[(i, kv)] = (first[:, None] + pieces).reshape(-1)
        return u


# The last call's plan: a layer-wise caller moves the same mapping once per layer. A plan is
# reused only for a mapping equal to the one it was built from (a copy is kept: comparing
# n int64s costs microseconds, building a plan a fraction of a millisecond); holding the
# paged cache keeps its id unique while the entry lives.
_LAST_PLAN: tuple = ()


def _plan_for(paged: PagedKV, slot_mapping: torch.Tensor, n_chunks: int, tokens: int, skip: int) -> _Plan:
    global _LAST_PLAN
    m = slot_mapping[:n_chunks * tokens]
    key = (id(paged), n_chunks, tokens, skip, m.dtype, m.device)
    last = _LAST_PLAN
    if last and last[0] == key and torch.equal(last[2], m):
        return last[3]
    plan = _Plan(paged, slot_mapping, n_chunks, tokens, skip)
    _LAST_PLAN = (key, paged, m.clone(), plan)
    return plan


def _take(a, idx, out=None):
    """Rows ``idx`` of ``a`` (along dim 0), written into ``out`` when given."""
    if isinstance(a, np.ndarray):  # one thread, GIL released; faster than np.take here
        rows = a[idx]
        if out is None:
            return rows
        out[...] = rows
        return out
    return a.index_select(0, idx) if out is None else torch.index_select(a, 0, idx, out=out)


def _put(a, idx, src) -> None:
    """``a[idx] = src`` along dim 0."""
    if isinstance(a, np.ndarray):
        a[idx] = src
    else:
        a.index_copy_(0, idx, src)


def _block_run(paged: PagedKV) -> int:
    """Units in a block's token rows when they are one contiguous run of memory (flash, blocks_first,
    mla), else 1. A chunk of whole blocks then moves one run per block instead of one row per token."""
    return paged.block_size if paged.num_pieces == 1 and paged.token_stride == paged.piece_size else 1


def _run_starts(units: np.ndarray, r: int) -> np.ndarray | None:
    """First unit of each run when ``units`` is runs of ``r`` consecutive units, else None."""
    if r <= 1 or units.size % r:
        return None
    starts = units[::r]
    return starts if np.array_equal(units.reshape(-1, r), starts[:, None] + np.arange(r)) else None


def _runs_view(flat: np.ndarray, r: int) -> np.ndarray:
    """``flat`` ``[units, S]`` as overlapping rows of ``r`` units: row u is units u .. u+r-1 (same memory)."""
    return as_strided(flat, (flat.shape[0] - r + 1, r * flat.shape[1]), flat.strides, writeable=True)


def _move(paged: PagedKV, slot_mapping: torch.Tensor, chunks: Sequence[torch.Tensor],
          skip: int, to_paged: bool, layers) -> Transfer:
    tokens, _ = check_args(paged, slot_mapping, chunks, skip)
    l0, l1 = layer_range(paged, layers)
    dev = paged.device
    plan = _plan_for(paged, slot_mapping, len(chunks), tokens, skip)
    views = [chunk_view(paged, c, tokens) for c in chunks]
    # Host cache and host chunks: numpy on views of the same memory, so the copy does not
    # depend on torch's thread pool (kvtier.hostcopy says why).
    host = dev.type == "cpu" and all(v.device.type == "cpu" for v in views)
    arr = host_array if host else (lambda t: t)
    if host:
        views = [arr(v) for v in views]
    if not to_paged:
        # Rows of tokens not moved are zeros (same contract as the GPU backend).
        moved = {c for c, pos, _, _ in plan.items if pos is None}
        for c, v in enumerate(views):
            if c not in moved:
                v[:, l0:l1] = 0
    w, s, npc = paged.width, paged.piece_size, paged.num_pieces
    flats = {layer: _flat_units(paged, layer) for layer in range(l0, l1)}
    flats = {layer: None if f is None else arr(f) for layer, f in flats.items()}
    r = _block_run(paged) if host and flats[l0] is not None else 1
    runs = {layer: _runs_view(f, r) for layer, f in flats.items()} if r > 1 else {}
    for i, (c, pos, blk, off) in enumerate(plan.items):
        # Chunks on another device (host buffers, CUDA cache, no Triton) go through a copy.
        work = views[c] if host or views[c].device == dev else views[c].to(dev)
        pos, blk, off = (None if pos is None else arr(pos)), arr(blk), arr(off)
        n = blk.shape[0]
        unit_rows = [arr(plan.units(paged, i, kv)) for kv in range(paged.num_kv)] if flats[l0] is not None else None
        rows_of, piece = flats, s
        if runs and pos is None:
            starts = [_run_starts(u, r) for u in unit_rows]
            if all(x is not None for x in starts):
                unit_rows, rows_of, piece = starts, runs, r * s
        for layer in range(l0, l1):
            flat = rows_of[layer]
            nd = arr(int_view(paged.rows(layer))) if flat is None else None
            for kv in range(paged.num_kv):
                buf = work[kv, layer]  # [T, W], contiguous
                units = None if flat is None else unit_rows[kv]
                if to_paged:
                    src = buf if pos is None else _take(buf, pos)
                    if flat is not None:
                        _put(flat, units, src.reshape(-1, piece))
                    else:  # strides that are not whole pieces: index the 5-D view
                        nd[blk, kv, off] = src.reshape(n, npc, s)
                    continue
                if flat is not None and pos is None:
                    _take(flat, units, out=buf.reshape(-1, piece))
                    continue
                rows = _take(flat, units) if flat is not None else nd[blk, kv, off]
                if pos is None:
                    buf[...] = rows.reshape(n, w)
                else:
                    _put(buf, pos, rows.reshape(n, w))
        if not to_paged and work is not views[c]:
            views[c][:, l0:l1].copy_(work[:, l0:l1])
    return Transfer()


def gather(paged: PagedKV, slot_mapping: torch.Tensor, chunks: Sequence[torch.Tensor],
           skip_prefix_n_tokens: int = 0, *, stream=None, mode=None, layers=None) -> Transfer:
    """Paged KV -> chunk buffers (save). Done when it returns; ``stream`` and ``mode`` are ignored.

    Chunk rows of tokens not moved (index < skip, slot -1) are written as zeros.
    """
    return _move(paged, slot_mapping, chunks, skip_prefix_n_tokens, False, layers)


def scatter(paged: PagedKV, slot_mapping: torch.Tensor, chunks: Sequence[torch.Tensor],
            skip_prefix_n_tokens: int = 0, *, stream=None, mode=None, layers=None) -> Transfer:
    """Chunk buffers -> paged KV (load). Done when it returns; ``stream`` and ``mode`` are ignored."""
    return _move(paged, slot_mapping, chunks, skip_prefix_n_tokens, True, layers)
