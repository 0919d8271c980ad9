"""Transfer kernels: the engine's paged KV cache <-> kvtier's contiguous chunk buffers.

One signature for every backend::

    paged = PagedKV.from_vllm(kv_caches)            # or PagedKV(layers, "flash", 16)
    t = gather(paged, slot_mapping, chunks)          # save: paged KV -> chunks
    t = scatter(paged, slot_mapping, chunks, skip)   # load: chunks -> paged KV
    t.wait()        # host waits;  or  t.wait_on(stream): that stream waits, on the GPU

``chunks[i]`` covers tokens ``[i*T, (i+1)*T)`` of ``slot_mapping`` (one slot
per token, -1 = leave that token alone). Only tokens at index >=
``skip_prefix_n_tokens`` with a slot >= 0 are read or written; nothing else in
the paged cache is touched (blocks below the skip may be shared through prefix
caching and read by other requests at that moment). ``layers=(lo, hi)`` moves
only layers ``[lo, hi)`` of every chunk (the other layers' bytes, in the chunk
and in the cache, are neither read nor written): a layer-wise load or save is
one call per layer.

The backend is picked by the cache's device: CUDA with Triton importable ->
:mod:`.triton_kernels` (every kind but ``cpu``); anything else, including a
``cpu``-kind cache forced onto CUDA, -> :mod:`.torch_ref`. ``backend=`` forces
one (``"triton"`` on a ``cpu``-kind cache raises :class:`LayoutError`).
"""

from __future__ import annotations

from typing import Sequence

import torch

from . import torch_ref
from .paged import KINDS, LayoutError, PagedKV, Transfer, detect

__all__ = ["KINDS", "LayoutError", "PagedKV", "Transfer", "backend_for", "detect", "gather", "scatter"]


def _triton():
    from . import triton_kernels

    return triton_kernels if triton_kernels.available() else None


def backend_for(paged: PagedKV, backend: str | None = None):
    """The module that moves data for ``paged``: ``"triton"``, ``"torch"`` or None (by device)."""
    if backend == "torch":
        return torch_ref
    if backend == "triton" or (backend is None and paged.device.type == "cuda" and paged.kind != "cpu"):
        mod = _triton()
        if mod is not None:
            return mod
        if backend == "triton":
            raise RuntimeError("backend='triton' asked for, but Triton is not importable or no GPU is present")
        return torch_ref
    if backend is not None:
        raise ValueError(f"unknown backend {backend!r}; use 'triton', 'torch' or None")
    return torch_ref


def gather(paged: PagedKV, slot_mapping: torch.Tensor, chunks: Sequence[torch.Tensor],
           skip_prefix_n_tokens: int = 0, *, stream=None, backend: str | None = None,
           mode: str | None = None, layers: tuple[int, int] | None = None) -> Transfer:
    """Paged KV -> chunk buffers (save). See the module docstring.

    ``mode`` ("staged" or "uva") picks the Triton host path; the torch backend ignores it.
    """
    return backend_for(paged, backend).gather(paged, slot_mapping, chunks, skip_prefix_n_tokens, stream=stream,
                                            mode=mode, layers=layers)


def scatter(paged: PagedKV, slot_mapping: torch.Tensor, chunks: Sequence[torch.Tensor],
            skip_prefix_n_tokens: int = 0, *, stream=None, backend: str | None = None,
           mode: str | None = None, layers: tuple[int, int] | None = None) -> Transfer:
    """Chunk buffers -> paged KV (load). See the module docstring.

    ``mode`` ("staged" or "uva") picks the Triton host path; the torch backend ignores it.
    """
    return backend_for(paged, backend).scatter(paged, slot_mapping, chunks, skip_prefix_n_tokens, stream=stream,
                                            mode=mode, layers=layers)
