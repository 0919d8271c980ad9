"""Copy chunks between vLLM's paged KV cache and kvtier chunk buffers (torch, any device).

A local adapter: it reads vLLM's per-layer cache tensors as logical
``[NB, 2, BS, H, D]`` strided views (no copy) and moves tokens with index ops,
so one code path serves every layout below. Chunk buffers are kvtier's
``[2, L, T, H*D]`` (``[L, T, D]`` for MLA), the same bytes whatever the engine
layout, so chunks saved by a CPU engine load into a CUDA one and back.

===============  ==========================  ======================================
kind             per-layer tensor            who
===============  ==========================  ======================================
``cpu``          ``[NB, H, BS, 2*D]``        vLLM CPU backend: per block and head,
                                             BS rows of K then BS rows of V
``flash``        ``[2, NB, BS, H, D]``       vLLM FlashAttention (CUDA)
``blocks_first`` ``[NB, 2, BS, H, D]``       FlashInfer and others
``mla``          ``[NB, BS, D]``             MLA latent cache
===============  ==========================  ======================================

The CPU layout is read from the attention kernel of vLLM 0.32
(``cpu_attn.py``: ``kv_cache.view(NB, H, 2*BS, D).chunk(2, dim=2)``); its shape
alone is ambiguous with ``[NB, 2, BS, H*D]`` when H == 2, which is why the kind is
decided from the device and the model's head count, never from the shape only.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch


class PagedLayoutError(ValueError):
    """The engine's KV cache tensors do not have a layout kvtier knows."""


def _layer_order(names: Sequence[str]) -> list[int]:
    def index(pos: int) -> tuple[int, int]:
        nums = re.findall(r"\.(\d+)(?:\.|$)", names[pos]) or re.findall(r"(\d+)", names[pos])
        return (int(nums[-1]) if nums else pos, pos)

    return sorted(range(len(names)), key=index)


class PagedLayers:
    """All layers of one rank's paged KV cache, as ``[NB, 2, BS, H, D]`` views."""

    def __init__(self, kv_caches: Mapping[str, torch.Tensor], num_kv_heads: int, head_size: int,
                 block_size: int, mla: bool = False, kind: str | None = None) -> None:
        if not kv_caches:
            raise PagedLayoutError("register_kv_caches got no KV cache tensors")
        names = list(kv_caches)
        tensors: list[torch.Tensor] = []
        seen: set[int] = set()
        for i in _layer_order(names):
            t = kv_caches[names[i]]
            if isinstance(t, (list, tuple)):
                raise PagedLayoutError(f"layer {names[i]}: a list of tensors per layer is not supported")
            if t.data_ptr() in seen:  # layers sharing one cache (cross-layer KV sharing)
                continue
            seen.add(t.data_ptr())
            tensors.append(t)
        first = tensors[0]
        self.block_size = block_size
        self.num_kv_heads = num_kv_heads
        self.head_size = head_size
        self.mla = mla
        self.kind = kind or self._detect(first, num_kv_heads, head_size, block_size, mla)
        self.layers = tensors
        self.views = [self._view(t) for t in tensors]
        self.num_blocks = self.views[0].shape[0]
        self.dtype = first.dtype
        self.device = first.device

    @staticmethod
    def _detect(t: torch.Tensor, h: int, d: int, bs: int, mla: bool) -> str:
        shape = tuple(t.shape)
        if mla:
            if t.dim() == 3 and shape[1] == bs:
                return "mla"
        elif t.device.type == "cpu" and t.dim() == 4 and shape[1:] == (h, bs, 2 * d):
            return "cpu"
        elif t.dim() == 5 and shape[0] == 2 and shape[2:] == (bs, h, d):
            return "flash"
        elif t.dim() == 5 and shape[1] == 2 and shape[2:] == (bs, h, d):
            return "blocks_first"
        raise PagedLayoutError(
            f"KV cache tensor of shape {list(shape)} on {t.device} matches no layout kvtier knows for "
            f"{h} KV heads x head size {d}, block size {bs}: expected cpu [NB, H, BS, 2*D], flash "
            f"[2, NB, BS, H, D], blocks_first [NB, 2, BS, H, D] or mla [NB, BS, D]"
        )

    def _view(self, t: torch.Tensor) -> torch.Tensor:
        h, d, bs = self.num_kv_heads, self.head_size, self.block_size
        if self.kind == "cpu":
            nb = t.shape[0]
            s0, s1, s2, s3 = t.stride()
            if s3 != 1 or s2 != 2 * d:
                raise PagedLayoutError(f"cpu KV cache with strides {list(t.stride())} is not row-contiguous")
            # [NB, H, BS, 2D] is [NB, H, (K|V), BS, D] in memory: K rows of a head, then its V rows.
            return t.as_strided((nb, 2, bs, h, d), (s0, bs * d, d, s1, 1))
        if self.kind == "flash":
            return t.permute(1, 0, 2, 3, 4)
        if self.kind == "blocks_first":
            return t
        if self.kind == "mla":
            return t
        raise PagedLayoutError(f"unknown KV layout kind {self.kind!r}")

    @property
    def num_layers(self) -> int:
        return len(self.views)

    @property
    def width(self) -> int:
        return self.head_size if self.mla else self.num_kv_heads * self.head_size

    def chunk_view(self, raw: torch.Tensor, tokens: int) -> torch.Tensor:
        """A raw uint8 chunk buffer as ``[2, L, T, W]`` (``[L, T, W]`` for MLA), same memory."""
        t = raw.view(self.dtype)
        if self.mla:
            return t.view(self.num_layers, tokens, self.width)
        return t.view(2, self.num_layers, tokens, self.width)

    def _index(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        slots = slots.to(device=self.device, dtype=torch.int64)
        return slots // self.block_size, slots % self.block_size

    def gather(self, chunk: torch.Tensor, token_idx: torch.Tensor, slots: torch.Tensor) -> None:
        """``chunk[..., token_idx[i], :] = cache[slots[i]]`` for every layer (chunk: typed view)."""
        blk, off = self._index(slots)
        dst_idx = token_idx.to(chunk.device)
        n = blk.numel()
        for layer, v in enumerate(self.views):
            if self.mla:
                chunk[layer, dst_idx] = v[blk, off].to(chunk.device)
            else:
                vals = v[blk, :, off]  # [n, 2, H, D]
                chunk[:, layer, dst_idx] = vals.permute(1, 0, 2, 3).reshape(2, n, self.width).to(chunk.device)

    def scatter(self, chunk: torch.Tensor, token_idx: torch.Tensor, slots: torch.Tensor) -> None:
        """``cache[slots[i]] = chunk[..., token_idx[i], :]`` for every layer; nothing else is written."""
        blk, off = self._index(slots)
        src_idx = token_idx.to(chunk.device)
        n = blk.numel()
        h, d = self.num_kv_heads, self.head_size
        for layer, v in enumerate(self.views):
            if self.mla:
                v[blk, off] = chunk[layer, src_idx].to(v.device)
            else:
                vals = chunk[:, layer, src_idx].reshape(2, n, h, d).permute(1, 0, 2, 3)
                v[blk, :, off] = vals.to(v.device)

    def describe(self) -> str:
        return (f"{self.kind} x{self.num_layers} layers {list(self.layers[0].shape)} "
                f"{str(self.dtype).removeprefix('torch.')} on {self.device}")
