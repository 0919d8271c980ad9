"""The shape of one stored chunk, and the header that travels with it.

A chunk of one TP rank is one contiguous buffer ``[2, L, T, W]`` (K/V, layer,
token, heads*head_size) or ``[L, T, W]`` for MLA. kvtier moves it as raw bytes
(a ``torch.uint8`` tensor) and views it typed only where a kernel needs it.

Every chunk written outside process memory (disk, Redis) carries a
:data:`HEADER_SIZE`-byte header: magic, format version, layout, payload size,
key and an xxh3-64 checksum of the payload, so a reader can tell a chunk of
another model, a truncated write or flipped bits from the real thing.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Annotated, Any

import msgspec
import numpy as np
from msgspec import Meta

import torch
import xxhash

MAGIC = b"KVTR"
HEADER_VERSION = 1
HEADER_SIZE = 256
_FIXED = struct.Struct("<4sHHIII16sQQ16s")  # magic ver flags layers tokens width dtype nbytes checksum key
_LABEL_MAX = HEADER_SIZE - _FIXED.size - 2

_DTYPES = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
    "float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2, "uint8": torch.uint8,
}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unsupported KV dtype {name!r}; supported: {', '.join(_DTYPES)}") from None


@dataclass(frozen=True)
class ChunkLayout:
    """Shape and dtype of one chunk: ``[2, L, T, W]``, or ``[L, T, W]`` when ``mla``."""

    num_layers: int
    tokens: int
    width: int
    dtype: torch.dtype
    mla: bool = False

    def __post_init__(self) -> None:
        for name in ("num_layers", "tokens", "width"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ChunkLayout.{name} must be > 0, got {getattr(self, name)}")

    @property
    def shape(self) -> tuple[int, ...]:
        if self.mla:
            return (self.num_layers, self.tokens, self.width)
        return (2, self.num_layers, self.tokens, self.width)

    @property
    def nbytes(self) -> int:
        n = self.num_layers * self.tokens * self.width * self.dtype.itemsize
        return n if self.mla else 2 * n

    def view(self, raw: torch.Tensor) -> torch.Tensor:
        """The typed ``shape`` view of a raw uint8 buffer of ``nbytes`` (no copy)."""
        if raw.dtype != torch.uint8 or raw.numel() != self.nbytes:
            raise ValueError(f"expected a uint8 buffer of {self.nbytes} bytes, got {raw.dtype} x {raw.numel()}")
        return raw.view(self.dtype).view(self.shape)

    def describe(self) -> str:
        return f"{'MLA ' if self.mla else ''}{list(self.shape)} {dtype_name(self.dtype)}"


class LayoutMsg(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A :class:`ChunkLayout` on the wire (`kvtier serve`'s protocol, the writer process's spec),
    bounded so a hostile peer cannot describe a huge chunk."""

    num_layers: Annotated[int, Meta(ge=1, le=1 << 16)]
    tokens: Annotated[int, Meta(ge=1, le=1 << 20)]
    width: Annotated[int, Meta(ge=1, le=1 << 20)]
    dtype: Annotated[str, Meta(max_length=32)]
    mla: bool = False


def layout_to_msg(layout: ChunkLayout) -> LayoutMsg:
    return LayoutMsg(layout.num_layers, layout.tokens, layout.width, dtype_name(layout.dtype), layout.mla)


def layout_from_msg(m: LayoutMsg) -> ChunkLayout:
    """The layout ``m`` describes; ValueError for an unknown dtype."""
    return ChunkLayout(m.num_layers, m.tokens, m.width, dtype_from_name(m.dtype), m.mla)


def checksum(payload: memoryview | bytes) -> int:
    # Through the hasher object: its update releases the GIL while it hashes, xxhash 3.x's
    # one-shot xxh3_64_intdigest does not (~2 ms per 32 MiB chunk, stalling the engine's thread).
    h = xxhash.xxh3_64()
    h.update(payload)
    return h.intdigest()


def encode_header(key: bytes, layout: ChunkLayout, payload: memoryview | bytes, label: str = "") -> bytes:
    """Header for ``payload`` stored under ``key``; ``label`` names the model for inspection."""
    lab = label.encode()[:_LABEL_MAX]
    fixed = _FIXED.pack(
        MAGIC, HEADER_VERSION, int(layout.mla), layout.num_layers, layout.tokens, layout.width,
        dtype_name(layout.dtype).encode().ljust(16, b"\0"), layout.nbytes, checksum(payload), key,
    )
    return (fixed + len(lab).to_bytes(2, "little") + lab).ljust(HEADER_SIZE, b"\0")


@dataclass(frozen=True)
class Header:
    key: bytes
    layout: ChunkLayout
    nbytes: int
    checksum: int
    label: str


class CorruptChunk(Exception):
    """A stored chunk failed validation; the caller treats it as a miss and removes it."""


def decode_header(raw: bytes | memoryview) -> Header:
    if len(raw) < HEADER_SIZE:
        raise CorruptChunk(f"header truncated ({len(raw)} of {HEADER_SIZE} bytes)")
    magic, ver, flags, layers, tokens, width, dt, nbytes, csum, key = _FIXED.unpack_from(raw, 0)
    if magic != MAGIC:
        raise CorruptChunk("bad magic: not a kvtier chunk")
    if ver != HEADER_VERSION:
        raise CorruptChunk(f"chunk format version {ver}, this kvtier reads {HEADER_VERSION}")
    try:
        layout = ChunkLayout(layers, tokens, width, dtype_from_name(bytes(dt).rstrip(b"\0").decode()), bool(flags & 1))
    except (ValueError, UnicodeDecodeError) as e:
        raise CorruptChunk(f"bad layout in header: {e}") from e
    if layout.nbytes != nbytes:
        raise CorruptChunk("header payload size disagrees with its layout")
    n = int.from_bytes(raw[_FIXED.size:_FIXED.size + 2], "little")
    label = bytes(raw[_FIXED.size + 2:_FIXED.size + 2 + n]).decode(errors="replace")
    return Header(bytes(key), layout, nbytes, csum, label)


def verify(header: Header, key: bytes, layout: ChunkLayout, payload: memoryview | bytes) -> None:
    """Raise :class:`CorruptChunk` unless ``payload`` is exactly what was stored under ``key``."""
    if header.key != key:
        raise CorruptChunk("chunk stored under another key")
    if header.layout != layout:
        raise CorruptChunk(f"layout {header.layout.describe()} differs from expected {layout.describe()}")
    if len(payload) != header.nbytes:
        raise CorruptChunk(f"payload truncated ({len(payload)} of {header.nbytes} bytes)")
    if checksum(payload) != header.checksum:
        raise CorruptChunk("checksum mismatch")


def payload_bytes(payload: Any, nbytes: int) -> np.ndarray:
    """``payload`` (a tensor or any buffer) as a flat uint8 array of exactly ``nbytes`` bytes.

    Raises ValueError naming both sizes, so a caller checks before it takes a slot.
    """
    if isinstance(payload, torch.Tensor):
        if not payload.is_contiguous():
            raise ValueError("a chunk payload tensor must be contiguous")
        src = payload.detach().cpu().reshape(-1).view(torch.uint8).numpy()
    else:
        src = np.frombuffer(payload, dtype=np.uint8)
    if src.size != nbytes:
        raise ValueError(f"a chunk payload must be {nbytes} bytes (this layout's chunk size); got {src.size}")
    return src
