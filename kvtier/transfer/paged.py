"""What a transfer kernel needs to know about the engine's paged KV cache.

The ``W = kv_heads * head_size`` elements of one (K/V, slot) pair -- one token
row -- sit at ``slot = block_id * block_size + offset``::

    row(layer, kv, slot) = base[layer] + block * block_stride + kv * kv_stride + offset * token_stride

(strides in elements). A row is ``num_pieces`` pieces of ``piece_size``
contiguous elements, ``piece_stride`` apart: one piece of ``W`` for the
5-D layouts and MLA, one piece of ``head_size`` per KV head for the 4-D ones
(``kv_split``, ``cpu``).
:class:`PagedKV` holds the per-layer tensors and those numbers; both backends
(:mod:`.torch_ref`, :mod:`.triton_kernels`) read only this description, so
one signature serves every layout:

==============  ==========================  ==============================================
kind            per-layer tensor            who uses it / memory order
==============  ==========================  ==============================================
``flash``       ``[2, NB, BS, H, D]``       vLLM FlashAttention (CUDA), older vLLM
``blocks_first````[NB, 2, BS, H, D]``       vLLM FlashInfer and others
``kv_split``    ``[NB, H, BS, 2*D]``        vLLM 0.32 GPU backends (FlashAttention,
                                            FlashInfer, Triton, FlexAttention): K is
                                            ``[..., :D]``, V ``[..., D:]``; any memory
                                            order with ``2*D`` contiguous (LBNHC, LBHNC, ...)
``cpu``         ``[NB, H, BS, 2*D]``        vLLM 0.32 CPU backend; memory is
                                            ``[NB, H, 2, BS, D]``: per block and head,
                                            BS rows of K then BS rows of V
``mla``         ``[NB, BS, D]``             MLA models (one latent row per token)
==============  ==========================  ==============================================

``kv_split`` is what vLLM 0.32's GPU attention reads
(``flash_attn.py``: ``kv_cache.transpose(1, 2).split(head_size, dim=-1)``):
a token's K row is H pieces of D, one per head, ``stride(1)`` apart.
The ``cpu`` layout is the one vLLM 0.32's CPU attention reads
(``cpu_attn.py``: ``kv_cache.view(NB, H, 2*BS, D).chunk(2, dim=2)``), so a
token's row is H pieces of D, ``2*BS*D`` apart (the head stride). The two
share a logical shape; a 4-D tensor is detected as ``cpu`` on the CPU and as
``kv_split`` anywhere else.

A tensor whose logical shape matches but whose memory is permuted (for
example a "HND" cache whose heads sit outside the token dimension of a
``flash`` shape) has rows that are not contiguous; :meth:`PagedKV.__init__`
refuses it with a message that says so, rather than moving wrong bytes.

This module also holds what both backends share: chunk-buffer validation,
the slot plan, and the :class:`Transfer` handle a call returns.
"""

from __future__ import annotations

import re
from typing import Mapping, Sequence

import torch

KINDS = ("flash", "blocks_first", "kv_split", "cpu", "mla")

# Same-size integer views: a copy never needs the float type, and integer
# index kernels exist for every dtype on every device (fp8 included).
_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def int_view(t: torch.Tensor) -> torch.Tensor:
    """``t`` reinterpreted as the integer dtype of the same element size (no copy)."""
    return t if t.dtype == _INT_OF_SIZE[t.element_size()] else t.view(_INT_OF_SIZE[t.element_size()])


class LayoutError(ValueError):
    """The KV cache tensors do not match the layout they were described as."""


def _kind_dims(kind: str) -> tuple[int, int | None, int, int, int]:
    """(ndim, kv dim or None, block dim, token dim, first width dim) of the contiguous-row layouts."""
    return {
        "flash": (5, 0, 1, 2, 3),
        "blocks_first": (5, 1, 0, 2, 3),
        "mla": (3, None, 0, 1, 2),
    }[kind]


_CPU_TOKEN_DIM = 2  # cpu and kv_split: [NB, H, BS, 2*D]


def _token_dim(kind: str) -> int:
    return _CPU_TOKEN_DIM if kind in ("cpu", "kv_split") else _kind_dims(kind)[3]


_EXPECTED = ("flash [2, NB, BS, H, D], blocks_first [NB, 2, BS, H, D], kv_split [NB, H, BS, 2*D] (GPU tensors), "
             "cpu [NB, H, BS, 2*D] (CPU tensors) "
             "or mla [NB, BS, D]")


def detect(t: torch.Tensor, block_size: int | None = None) -> str:
    """Guess the layout kind of one layer's KV cache tensor from its shape (and device).

    A 4-D ``[NB, H, BS, 2*D]`` tensor is ``cpu`` on the CPU and ``kv_split``
    elsewhere (see the module docstring). Raises :class:`LayoutError` when the tensor fits no layout or fits
    two (e.g. ``[2, 2, BS, H, D]`` with two blocks); pass ``kind=`` then.
    """
    shape = tuple(t.shape)
    what = f"KV cache tensor of shape {list(shape)} on {t.device}" + (
        f" with block_size={block_size}" if block_size else "")
    cands = []
    if t.dim() == 5 and shape[0] == 2:
        cands.append("flash")
    if t.dim() == 5 and shape[1] == 2:
        cands.append("blocks_first")
    if t.dim() == 4 and shape[3] % 2 == 0:
        cands.append("cpu" if t.device.type == "cpu" else "kv_split")
    if t.dim() == 3:
        cands.append("mla")
    if block_size is not None:
        cands = [k for k in cands if shape[_token_dim(k)] == block_size]
    if len(cands) == 1:
        return cands[0]
    if not cands:
        raise LayoutError(f"{what} matches no known layout: expected {_EXPECTED}")
    raise LayoutError(f"{what} is ambiguous ({' or '.join(cands)}); pass kind= explicitly")


def _cpu_geometry(first: torch.Tensor, block_size: int | None) -> dict:
    """vLLM 0.32 CPU layout: tensor [NB, H, BS, 2*D], memory [NB, H, 2, BS, D]."""
    shape = tuple(first.shape)
    if first.dim() != 4:
        raise LayoutError(f"layout 'cpu' expects 4-dim per-layer tensors [NB, H, BS, 2*D], got shape {list(shape)}")
    nb, h, bs, d2 = shape
    if d2 % 2:
        raise LayoutError(f"layout 'cpu' expects [NB, H, BS, 2*D] with an even last dim, got shape {list(shape)}")
    if block_size is not None and block_size != bs:
        raise LayoutError(f"block_size={block_size} but layout 'cpu' tensor has {bs} at dim {_CPU_TOKEN_DIM} "
                          f"(shape {list(shape)})")
    d = d2 // 2
    # vLLM views each (block, head) as [2*BS, D] rows (K rows then V rows): the BS x 2D
    # part must be one contiguous run.
    if (d2 > 1 and first.stride(3) != 1) or (bs > 1 and first.stride(2) != d2):
        raise LayoutError(
            f"layout 'cpu': the [BS, 2*D] = {[bs, d2]} part of each (block, head) of shape {list(shape)} is "
            f"not contiguous (strides {list(first.stride())}); vLLM's CPU backend views it as [2*BS, D]"
        )
    return dict(num_blocks=nb, block_size=bs, width=h * d, num_kv=2, block_stride=first.stride(0),
                kv_stride=bs * d, token_stride=d, num_pieces=h, piece_size=d,
                piece_stride=first.stride(1) if h > 1 else d)


def _kv_split_geometry(first: torch.Tensor, block_size: int | None) -> dict:
    """vLLM 0.32 GPU layout: tensor [NB, H, BS, 2*D], K = [..., :D], V = [..., D:], any dim order."""
    shape = tuple(first.shape)
    if first.dim() != 4 or shape[3] % 2:
        raise LayoutError(f"layout 'kv_split' expects 4-dim per-layer tensors [NB, H, BS, 2*D], got shape "
                          f"{list(shape)}")
    nb, h, bs, d2 = shape
    if block_size is not None and block_size != bs:
        raise LayoutError(f"block_size={block_size} but layout 'kv_split' tensor has {bs} at dim {_CPU_TOKEN_DIM} "
                          f"(shape {list(shape)})")
    if d2 > 1 and first.stride(3) != 1:
        raise LayoutError(f"layout 'kv_split': the 2*D = {d2} elements of each (block, head, token) of shape "
                          f"{list(shape)} are not contiguous (strides {list(first.stride())})")
    d = d2 // 2
    return dict(num_blocks=nb, block_size=bs, width=h * d, num_kv=2, block_stride=first.stride(0),
                kv_stride=d, token_stride=first.stride(2) if bs > 1 else d2, num_pieces=h, piece_size=d,
                piece_stride=first.stride(1) if h > 1 else d2)


def _row_geometry(kind: str, first: torch.Tensor, block_size: int | None) -> dict:
    """flash / blocks_first / mla: one contiguous row of W per (kv, slot)."""
    ndim, kv_dim, blk_dim, tok_dim, w_dim = _kind_dims(kind)
    shape = tuple(first.shape)
    if first.dim() != ndim:
        raise LayoutError(f"layout {kind!r} expects {ndim}-dim per-layer tensors, got shape {list(shape)}")
    if kv_dim is not None and shape[kv_dim] != 2:
        raise LayoutError(f"layout {kind!r} expects 2 (K, V) at dim {kv_dim}, got shape {list(shape)}")
    bs = shape[tok_dim]
    if block_size is not None and block_size != bs:
        raise LayoutError(f"block_size={block_size} but layout {kind!r} tensor has {bs} at dim {tok_dim} "
                          f"(shape {list(shape)})")
    width = 1
    for d in shape[w_dim:]:
        width *= d
    # The (kv, slot) row of W elements must be contiguous.
    expect = 1
    for d in range(ndim - 1, w_dim - 1, -1):
        if shape[d] > 1 and first.stride(d) != expect:
            raise LayoutError(
                f"layout {kind!r}: the {width} elements of one token row (dims {w_dim}.. of shape "
                f"{list(shape)}) are not contiguous (strides {list(first.stride())}); a permuted "
                f"(e.g. HND) cache is not supported"
            )
        expect *= shape[d]
    return dict(num_blocks=shape[blk_dim], block_size=bs, width=width, num_kv=1 if kv_dim is None else 2,
                block_stride=first.stride(blk_dim), kv_stride=0 if kv_dim is None else first.stride(kv_dim),
                token_stride=first.stride(tok_dim) if bs > 1 else width, num_pieces=1, piece_size=width,
                piece_stride=width)


class PagedKV:
    """The engine's paged KV cache of one TP rank: one tensor per layer, one layout.

    ``PagedKV(layers, kind, block_size)`` validates and fills in the rest;
    ``kind=None`` detects it from the shape. Strides are in elements.

    Attributes: ``layers`` (tuple), ``kind``, ``block_size``, ``num_blocks``,
    ``width`` (W), ``num_kv`` (2, or 1 for MLA), ``block_stride``,
    ``kv_stride`` (0 for MLA), ``token_stride``, and the row's pieces:
    ``num_pieces`` pieces of ``piece_size`` contiguous elements, ``piece_stride``
    apart (``1, W, W`` when the row is contiguous; ``H, D, head stride`` for ``kv_split`` and ``cpu``).
    """

    def __init__(self, layers: Sequence[torch.Tensor], kind: str | None = None, block_size: int | None = None):
        layers = tuple(layers)
        if not layers:
            raise LayoutError("PagedKV needs at least one layer tensor")
        first = layers[0]
        if not isinstance(first, torch.Tensor):
            raise LayoutError(f"PagedKV layers must be tensors, got {type(first).__name__}")
        if kind is None:
            kind = detect(first, block_size)
        if kind not in KINDS:
            raise LayoutError(f"unknown KV layout kind {kind!r}; known: {', '.join(KINDS)}")
        if kind == "cpu":
            geo = _cpu_geometry(first, block_size)
        elif kind == "kv_split":
            geo = _kv_split_geometry(first, block_size)
        else:
            geo = _row_geometry(kind, first, block_size)
        shape = tuple(first.shape)
        for i, t in enumerate(layers):
            if not isinstance(t, torch.Tensor):
                raise LayoutError(f"layer {i} is a {type(t).__name__}, not a tensor")
            if tuple(t.shape) != shape or t.dtype != first.dtype or t.device != first.device:
                raise LayoutError(
                    f"layer {i} is {list(t.shape)} {t.dtype} on {t.device}; layer 0 is "
                    f"{list(shape)} {first.dtype} on {first.device}: all layers must match"
                )
            if t.stride() != first.stride():
                raise LayoutError(f"layer {i} strides {list(t.stride())} differ from layer 0's {list(first.stride())}")
        self.layers = layers
        self.layer_index: dict[str, int] = {}  # engine layer name -> index (set by from_vllm)
        self.kind = kind
        self.block_size: int = geo["block_size"]
        self.num_blocks: int = geo["num_blocks"]
        self.width: int = geo["width"]
        self.num_kv: int = geo["num_kv"]
        self.block_stride: int = geo["block_stride"]
        self.kv_stride: int = geo["kv_stride"]
        self.token_stride: int = geo["token_stride"]
        self.num_pieces: int = geo["num_pieces"]
        self.piece_size: int = geo["piece_size"]
        self.piece_stride: int = geo["piece_stride"]

    # ------------------------------------------------------------------ builders
    @classmethod
    def from_vllm(
        cls, kv_caches: Mapping[str, torch.Tensor], kind: str | None = None, block_size: int | None = None
    ) -> "PagedKV":
        """Build from vLLM's ``register_kv_caches`` dict (layer name -> tensor).

        Layers are ordered by the integer in their name (``model.layers.12.self_attn.attn``
        is layer 12), falling back to the dict's order for names without one. Several
        names sharing one tensor (cross-layer KV sharing) are kept once. ``layer_index``
        maps each name to its layer's index (names sharing a tensor share an index).
        """
        if not kv_caches:
            raise LayoutError("from_vllm got no KV cache tensors")

        def index(item: tuple[int, tuple[str, torch.Tensor]]) -> tuple[int, int]:
            pos, (name, _) = item
            nums = re.findall(r"\.(\d+)(?:\.|$)", name) or re.findall(r"(\d+)", name)
            return (int(nums[-1]) if nums else pos, pos)

        ordered = [(name, t) for _, (name, t) in sorted(enumerate(kv_caches.items()), key=index)]
        position: dict[int, int] = {}  # data_ptr -> layer index
        unique = []
        names: dict[str, int] = {}
        for name, t in ordered:
            key = t.data_ptr()
            if key not in position:
                position[key] = len(unique)
                unique.append(t)
            names[name] = position[key]
        paged = cls(unique, kind=kind, block_size=block_size)
        paged.layer_index = names
        return paged

    # ------------------------------------------------------------------ facts
    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def dtype(self) -> torch.dtype:
        return self.layers[0].dtype

    @property
    def device(self) -> torch.device:
        return self.layers[0].device

    @property
    def mla(self) -> bool:
        return self.num_kv == 1

    @property
    def num_slots(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def itemsize(self) -> int:
        return self.layers[0].element_size()

    def chunk_shape(self, tokens: int) -> tuple[int, ...]:
        """Shape of one chunk of ``tokens`` tokens: ``[2, L, T, W]`` or ``[L, T, W]`` for MLA."""
        if self.mla:
            return (self.num_layers, tokens, self.width)
        return (2, self.num_layers, tokens, self.width)

    def chunk_nbytes(self, tokens: int) -> int:
        return self.num_kv * self.num_layers * tokens * self.width * self.itemsize

    def chunk_layout(self, tokens: int):
        """The matching :class:`kvtier.layout.ChunkLayout` (for headers and the store)."""
        from kvtier.layout import ChunkLayout

        return ChunkLayout(self.num_layers, tokens, self.width, self.dtype, self.mla)

    @property
    def row_contiguous(self) -> bool:
        """Each (kv, slot) row is one run of W elements (every kind but ``kv_split``/``cpu`` with H > 1)."""
        return self.num_pieces == 1

    def rows(self, layer: int) -> torch.Tensor:
        """Layer ``layer`` as a ``[NB, num_kv, BS, num_pieces, piece_size]`` strided view (same memory).

        ``rows(l)[blk, kv, off].reshape(-1)`` is the W elements of one token row.
        """
        t = self.layers[layer]
        return t.as_strided(
            (self.num_blocks, self.num_kv, self.block_size, self.num_pieces, self.piece_size),
            (self.block_stride, self.kv_stride or 1, self.token_stride, self.piece_stride, 1),
        )

    def __repr__(self) -> str:
        return f"PagedKV({self.describe()})"

    def describe(self) -> str:
        return (f"{self.kind} x{self.num_layers} layers {list(self.layers[0].shape)} "
                f"{str(self.dtype).removeprefix('torch.')} on {self.device}")


# ---------------------------------------------------------------------- shared
def chunk_tokens(paged: PagedKV, chunks: Sequence[torch.Tensor]) -> int:
    """Tokens per chunk (T), checked for every buffer; raises ValueError with the reason."""
    if len(chunks) == 0:
        raise ValueError("no chunk buffers given")
    per_token = paged.chunk_nbytes(1)
    tokens = None
    for i, c in enumerate(chunks):
        if not isinstance(c, torch.Tensor):
            raise ValueError(f"chunk {i} is a {type(c).__name__}, not a tensor")
        if c.dtype == torch.uint8 and c.dim() == 1:
            if c.numel() % per_token:
                raise ValueError(
                    f"chunk {i} has {c.numel()} bytes, not a whole number of tokens of "
                    f"{per_token} bytes ({paged.describe()})"
                )
            t = c.numel() // per_token
        else:
            if c.dtype != paged.dtype:
                raise ValueError(f"chunk {i} dtype {c.dtype} differs from the KV cache dtype {paged.dtype}")
            expect = paged.chunk_shape(c.shape[-2] if c.dim() >= 2 else 0)
            if tuple(c.shape) != expect:
                raise ValueError(f"chunk {i} has shape {list(c.shape)}, expected {list(expect)} "
                                 f"([2, L, T, W], or [L, T, W] for MLA)")
            t = c.shape[-2]
        if not c.is_contiguous():
            raise ValueError(f"chunk {i} is not contiguous")
        if tokens is None:
            tokens = t
        elif t != tokens:
            raise ValueError(f"chunk {i} holds {t} tokens, chunk 0 holds {tokens}: all chunks must be the same size")
    if not tokens:
        raise ValueError("chunk buffers hold zero tokens")
    return tokens


def chunk_view(paged: PagedKV, c: torch.Tensor, tokens: int) -> torch.Tensor:
    """Chunk buffer as an integer ``[num_kv, L, T, W]`` view (same memory)."""
    return int_view(c.view(paged.dtype) if c.dtype == torch.uint8 else c).view(
        paged.num_kv, paged.num_layers, tokens, paged.width
    )


def layer_range(paged: PagedKV, layers) -> tuple[int, int]:
    """``layers`` of a call -- None (all) or ``(lo, hi)`` -- as a checked ``(lo, hi)``."""
    if layers is None:
        return 0, paged.num_layers
    try:
        lo, hi = (int(x) for x in layers)
    except (TypeError, ValueError):
        raise ValueError(f"layers must be None or a (lo, hi) pair of ints, got {layers!r}") from None
    if not 0 <= lo < hi <= paged.num_layers:
        raise ValueError(f"layers=({lo}, {hi}) is not a non-empty range inside the cache's "
                         f"{paged.num_layers} layers")
    return lo, hi


def check_args(paged: PagedKV, slot_mapping: torch.Tensor, chunks: Sequence[torch.Tensor], skip: int) -> tuple[int, int]:
    """Validate a gather/scatter call; returns (T, number of tokens)."""
    if not isinstance(paged, PagedKV):
        raise TypeError(f"paged must be a PagedKV, got {type(paged).__name__}")
    tokens = chunk_tokens(paged, chunks)
    n = len(chunks) * tokens
    if not isinstance(skip, int) or not 0 <= skip < tokens:
        raise ValueError(f"skip_prefix_n_tokens must be an int in [0, {tokens}) (chunk size), got {skip!r}")
    if not isinstance(slot_mapping, torch.Tensor) or slot_mapping.dim() != 1:
        raise ValueError("slot_mapping must be a 1-D tensor (one slot per token, -1 = skip)")
    if slot_mapping.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"slot_mapping must be int64 (or int32), got {slot_mapping.dtype}")
    if slot_mapping.numel() < n:
        raise ValueError(
            f"slot_mapping has {slot_mapping.numel()} entries but the {len(chunks)} chunk buffers "
            f"of {tokens} tokens cover {n} tokens"
        )
    return tokens, n


def check_slots_host(paged: PagedKV, slots: torch.Tensor) -> None:
    """Raise if a slot (>= 0) lies past the cache; cheap on a CPU tensor."""
    if slots.numel() and int(slots.max()) >= paged.num_slots:
        raise ValueError(f"slot_mapping holds slot {int(slots.max())} but the cache has only "
                         f"{paged.num_slots} slots ({paged.num_blocks} blocks x {paged.block_size})")


class Transfer:
    """Handle of one gather/scatter call.

    On CPU the work is done when the call returns. On CUDA the call only
    enqueues work on kvtier's side streams; ``event`` is recorded after the
    last of it. ``wait()`` blocks the host; ``wait_on(stream)`` makes a stream
    (default: the current one) wait on the GPU, without blocking the host.
    """

    __slots__ = ("event", "_keep")

    def __init__(self, event=None, keep=None) -> None:
        self.event = event
        self._keep = keep  # buffers that must outlive the enqueued work

    def done(self) -> bool:
        return self.event is None or self.event.query()

    def wait(self) -> None:
        if self.event is not None:
            self.event.synchronize()
        self._keep = None

    def wait_on(self, stream=None) -> None:
        if self.event is not None:
            (stream if stream is not None else torch.cuda.current_stream()).wait_event(self.event)
