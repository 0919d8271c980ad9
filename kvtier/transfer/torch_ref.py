"""Vectorised torch implementation of gather/scatter (any device; used on CPU).

It is what CPU engines use and the oracle the Triton kernels are tested
against. Each layer is seen as a flat ``[units, S]`` array of pieces
(``S = piece_size``: the whole row W for contiguous-row layouts, one head's D
for vLLM's ``cpu`` layout), so a token row is ``num_pieces`` unit indices and a
chunk is moved with one ``index_select`` / ``index_copy_`` per (chunk, layer,
K/V): whole pieces, no per-token Python. Strides that are not whole pieces
(padded rows) fall back to advanced indexing on a 5-D strided view.
Data moves as same-size integers, so fp8 works wherever int8 does.
"""

from __future__ import annotations

from typing import Sequence

import torch

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


def _move(paged: PagedKV, slot_mapping: torch.Tensor, chunks: Sequence[torch.Tensor],
          skip: int, to_paged: bool, layers) -> Transfer:
    tokens, _ = check_args(paged, slot_mapping, chunks, skip)
    l0, l1 = layer_range(paged, layers)
    dev = paged.device
    plan = _plan_for(paged, slot_mapping, len(chunks), tokens, skip)
    views = [chunk_view(paged, c, tokens) for c in chunks]
    if not to_paged:
        # Rows of tokens not moved are zeros (same contract as the GPU backend).
        moved = {c for c, pos, _, _ in plan.items if pos is None}
        for c, v in enumerate(views):
            if c not in moved:
                v[:, l0:l1].zero_()
    w, s, npc = paged.width, paged.piece_size, paged.num_pieces
    flats = {layer: _flat_units(paged, layer) for layer in range(l0, l1)}
    for i, (c, pos, blk, off) in enumerate(plan.items):
        # Chunks on another device (host buffers, CUDA cache, no Triton) go through a copy.
        work = views[c] if views[c].device == dev else views[c].to(dev)
        n = blk.numel()
        for layer in range(l0, l1):
            flat = flats[layer]
            nd = int_view(paged.rows(layer)) if flat is None else None
            for kv in range(paged.num_kv):
                buf = work[kv, layer]  # [T, W], contiguous
                if flat is not None:
                    units = plan.units(paged, i, kv)
                    if to_paged:
                        src = buf if pos is None else buf.index_select(0, pos)
                        flat.index_copy_(0, units, src.view(-1, s))
                    elif pos is None:
                        torch.index_select(flat, 0, units, out=buf.view(-1, s))
                    else:
                        buf.index_copy_(0, pos, flat.index_select(0, units).view(n, w))
                else:  # strides that are not whole pieces: index the 5-D view
                    if to_paged:
                        src = buf if pos is None else buf.index_select(0, pos)
                        nd[blk, kv, off] = src.view(n, npc, s)
                    elif pos is None:
                        buf.copy_(nd[blk, kv, off].reshape(n, w))
                    else:
                        buf.index_copy_(0, pos, nd[blk, kv, off].reshape(n, w))
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
