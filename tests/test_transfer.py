"""Transfer kernels (CPU): gather/scatter against a naive per-token oracle.

Every layout, every dtype, random shapes and slot mappings with -1 holes,
every skip value of a small chunk, and the invariant that a load touches
nothing but the slots it owns. The same oracle helpers are imported by
tests/gpu/test_transfer_gpu.py for the Triton backend.

The oracle is deliberately naive: one Python loop iteration per token, layer
and K/V, indexing the engine tensor by its logical layout
(``[2, NB, BS, H, D]`` etc.), sharing no code with kvtier.transfer. For the
``cpu`` layout (vLLM 0.32's CPU backend, ``[NB, H, BS, 2*D]``) it reads the
tensor the way vLLM's CPU attention does: ``view(NB, H, 2*BS, D)``, K rows
``[0, BS)`` and V rows ``[BS, 2*BS)`` of each (block, head).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvtier.transfer import LayoutError, PagedKV, detect, gather, scatter
from kvtier.transfer import torch_ref

KINDS = ["flash", "blocks_first", "kv_split", "cpu", "mla"]

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
if hasattr(torch, "float8_e4m3fn"):
    DTYPES.append(torch.float8_e4m3fn)

_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def as_int(t: torch.Tensor) -> torch.Tensor:
    return t.view(_INT[t.element_size()])


def random_bytes(shape, dtype, gen: torch.Generator, device="cpu") -> torch.Tensor:
    """A tensor of ``shape``/``dtype`` holding random bytes (NaN patterns included)."""
    n = 1
    for s in shape:
        n *= s
    n *= torch.empty((), dtype=dtype).element_size()
    b = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=gen)
    return b.view(dtype).view(shape).to(device)


def make_layers(kind: str, L: int, NB: int, BS: int, H: int, D: int, dtype, gen, device="cpu",
                variant: str = "plain") -> list[torch.Tensor]:
    """Per-layer KV tensors of a layout, filled with random bytes.

    variant: "plain" (one allocation per layer), "one_buffer" (all layers are
    views of one allocation, like an engine that allocates one big buffer),
    "permuted" (flash <-> blocks_first: the logical shape of one, the memory
    order of the other; kv_split: tokens outside heads in memory, vLLM's LBNHC), "padded" (cpu/mla only: padding in memory, so a stride
    is not a whole piece: mla pads each token row, cpu each (block, head)).
    """
    shapes = {
        "flash": (2, NB, BS, H, D),
        "blocks_first": (NB, 2, BS, H, D),
        "kv_split": (NB, H, BS, 2 * D),
        "cpu": (NB, H, BS, 2 * D),
        "mla": (NB, BS, D),
    }
    shape = shapes[kind]
    if variant == "plain":
        return [random_bytes(shape, dtype, gen, device) for _ in range(L)]
    if variant == "one_buffer":
        n = 1
        for s in shape:
            n *= s
        big = random_bytes((L * n,), dtype, gen, device)
        return [big[i * n:(i + 1) * n].view(shape) for i in range(L)]
    if variant == "permuted" and kind == "kv_split":
        # Memory [NB, BS, H, 2D] (vLLM's LBNHC, FlashAttention's order) behind the logical [NB, H, BS, 2D].
        return [random_bytes((NB, BS, H, 2 * D), dtype, gen, device).transpose(1, 2) for _ in range(L)]
    if variant == "permuted":
        assert kind in ("flash", "blocks_first")
        phys = (NB, 2, BS, H, D) if kind == "flash" else (2, NB, BS, H, D)
        return [random_bytes(phys, dtype, gen, device).transpose(0, 1) for _ in range(L)]
    if variant == "padded" and kind == "cpu":
        # [NB, H, BS*2D + 3] sliced: the (BS, 2D) part of each (block, head) stays one run,
        # as vLLM's view(NB, H, 2*BS, D) needs; the head stride is not a multiple of D.
        return [random_bytes((NB, H, BS * 2 * D + 3), dtype, gen, device)[..., : BS * 2 * D].view(shape)
                for _ in range(L)]
    if variant == "padded":
        assert kind == "mla"
        pad = 3
        big_shape = shape[:-1] + (shape[-1] + pad,)
        return [random_bytes(big_shape, dtype, gen, device)[..., : shape[-1]] for _ in range(L)]
    raise ValueError(variant)


def row(layer: torch.Tensor, kind: str, kv: int, slot: int, bs: int) -> torch.Tensor:
    """The (kv, slot) token row of one layer, as a view: ``[W]``, or ``[H, D]`` for ``kv_split``/``cpu``."""
    blk, off = divmod(slot, bs)
    if kind == "flash":
        r = layer[kv, blk, off]
    elif kind == "blocks_first":
        r = layer[blk, kv, off]
    elif kind == "kv_split":
        # Exactly vLLM 0.32's flash_attn.py: kv_cache.transpose(1, 2).split(head_size, dim=-1).
        key_cache, value_cache = layer.transpose(1, 2).split(layer.shape[3] // 2, dim=-1)
        return (key_cache, value_cache)[kv][blk, off]  # [H, D]
    elif kind == "cpu":
        nb, h, bs_, d2 = layer.shape
        assert bs_ == bs
        # Exactly vLLM 0.32's cpu_attn.py: view(NB, H, 2*BS, D).chunk(2, dim=2) -> key_cache, value_cache.
        key_cache, value_cache = layer.view(nb, h, 2 * bs, d2 // 2).chunk(2, dim=2)
        return (key_cache, value_cache)[kv][blk, :, off]  # [H, D]
    else:
        r = layer[blk, off]
    return r.reshape(-1) if r.is_contiguous() else r.view(-1)


def put_row(r: torch.Tensor, src: torch.Tensor) -> None:
    """Write a W-element chunk row into a (possibly [H, D]) row view."""
    r.copy_(src.reshape(r.shape))


def naive_gather(layers, kind, bs, mapping, chunks4, skip, lrange=None):
    """chunks4: list of [KV, L, T, W] views; rows of tokens not moved become zeros.

    ``lrange=(lo, hi)``: only those layers (the others' chunk rows are left alone).
    """
    T = chunks4[0].shape[2]
    nkv = 1 if kind == "mla" else 2
    m = mapping.tolist()
    lo, hi = lrange or (0, len(layers))
    for t in range(len(chunks4) * T):
        c, i = divmod(t, T)
        for l, layer in list(enumerate(layers))[lo:hi]:
            for kv in range(nkv):
                if t < skip or m[t] < 0:
                    chunks4[c][kv, l, i].zero_()
                else:
                    chunks4[c][kv, l, i].copy_(row(layer, kind, kv, m[t], bs).reshape(-1))


def naive_scatter(layers, kind, bs, mapping, chunks4, skip, lrange=None):
    T = chunks4[0].shape[2]
    nkv = 1 if kind == "mla" else 2
    m = mapping.tolist()
    lo, hi = lrange or (0, len(layers))
    for t in range(len(chunks4) * T):
        c, i = divmod(t, T)
        if t < skip or m[t] < 0:
            continue
        for l, layer in list(enumerate(layers))[lo:hi]:
            for kv in range(nkv):
                put_row(row(layer, kind, kv, m[t], bs), chunks4[c][kv, l, i])


def random_mapping(num_slots: int, n: int, hole_p: float, gen: torch.Generator, device="cpu",
                   dtype=torch.int64) -> torch.Tensor:
    """n distinct slots in random order (n <= num_slots), each -1 with probability hole_p."""
    m = torch.randperm(num_slots, generator=gen)[:n].to(torch.int64)
    holes = torch.rand(n, generator=gen) < hole_p
    m[holes] = -1
    return m.to(dtype).to(device)


def owned_slots(mapping: torch.Tensor, n: int, skip: int) -> set[int]:
    m = mapping[:n].tolist()
    return {s for t, s in enumerate(m) if t >= skip and s >= 0}


def all_rows(layers, kind, bs, nb):
    """{(layer, kv, slot): row view} for every row of the cache."""
    nkv = 1 if kind == "mla" else 2
    return {(l, kv, s): row(layer, kind, kv, s, bs)
            for l, layer in enumerate(layers) for kv in range(nkv) for s in range(nb * bs)}


# ---------------------------------------------------------------------- cases
class Case:
    """A paged cache (random bytes), a slot mapping with holes and random chunk buffers.

    Built from a seed, so building it twice gives two byte-identical copies.
    """

    def __init__(self, kind, dtype, L=2, NB=8, BS=4, H=2, D=8, T=8, n_chunks=2, hole_p=0.2, seed=0,
                 variant="plain", raw=False, device="cpu", map_dtype=torch.int64, map_extra=0):
        gen = torch.Generator().manual_seed(seed)
        if kind == "mla":
            H = 1
        self.kind, self.BS, self.NB, self.T = kind, BS, NB, T
        self.nkv = 1 if kind == "mla" else 2
        self.W = H * D
        self.layers = make_layers(kind, L, NB, BS, H, D, dtype, gen, device, variant)
        self.paged = PagedKV(self.layers, kind, BS)
        self.n = n_chunks * T
        assert self.n + map_extra <= NB * BS
        self.mapping = random_mapping(NB * BS, self.n + map_extra, hole_p, gen, device, map_dtype)
        shape = (L, T, self.W) if kind == "mla" else (2, L, T, self.W)
        typed = [random_bytes(shape, dtype, gen, device) for _ in range(n_chunks)]
        self.chunks = [c.view(-1).view(torch.uint8) for c in typed] if raw else typed
        self.chunks4 = [c.view(dtype).view(self.nkv, L, T, self.W) for c in self.chunks]

    def storages(self):
        """The full memory behind each layer (padding included), as bytes."""
        return [(t._base if t._base is not None else t).view(-1).view(torch.uint8) for t in self.layers]


def _eq_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same bytes, element for element (a [H, D] cpu row compares with a [W] chunk row)."""
    return torch.equal(as_int(a).reshape(-1).cpu(), as_int(b).reshape(-1).cpu())


def _variants(kind):
    v = ["plain", "one_buffer"]
    v += ["permuted"] if kind in ("flash", "blocks_first", "kv_split") else ["padded"]
    return v


case_params = st.fixed_dictionaries({
    "kind": st.sampled_from(KINDS),
    "dtype": st.sampled_from(DTYPES),
    "L": st.integers(1, 3),
    "BS": st.sampled_from([1, 2, 4, 8, 16]),
    "H": st.sampled_from([1, 2, 3, 4]),
    "D": st.sampled_from([1, 2, 4, 8, 16]),
    "T": st.sampled_from([2, 4, 8, 16]),
    "n_chunks": st.integers(1, 3),
    "hole_p": st.sampled_from([0.0, 0.0, 0.1, 0.5]),
    "seed": st.integers(0, 2**31 - 1),
    "raw": st.booleans(),
    "vpick": st.integers(0, 2),
    "skip_frac": st.floats(0, 0.999),
    "extra_blocks": st.integers(0, 4),
    # None: all layers; else a layer range [lo, hi) cut from L (a layer-wise call)
    "lrange": st.one_of(st.none(), st.tuples(st.integers(0, 2), st.integers(1, 3))),
})


def _case_from(p, device="cpu"):
    n = p["n_chunks"] * p["T"]
    nb = -(-n // p["BS"]) + p["extra_blocks"]
    variant = _variants(p["kind"])[p["vpick"]]
    skip = int(p["skip_frac"] * p["T"])
    kw = {k: p[k] for k in ("kind", "dtype", "L", "BS", "H", "D", "T", "n_chunks", "hole_p", "seed", "raw")}
    return kw | {"NB": nb, "variant": variant, "device": device}, skip


def _lrange(p):
    """The case's layer range, fitted inside its L layers (None: all)."""
    if p["lrange"] is None:
        return None
    lo = min(p["lrange"][0], p["L"] - 1)
    return lo, min(p["L"], lo + p["lrange"][1])


SETTINGS = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------------- equality vs the oracle
@SETTINGS
@given(case_params)
def test_gather_matches_naive_oracle(p):
    kw, skip = _case_from(p)
    ours, ref = Case(**kw), Case(**kw)
    t = gather(ours.paged, ours.mapping, ours.chunks, skip, layers=_lrange(p))
    assert t.done()
    naive_gather(ref.layers, ref.kind, ref.BS, ref.mapping, ref.chunks4, skip, _lrange(p))
    for a, b in zip(ours.chunks4, ref.chunks4):
        assert _eq_bytes(a, b)
    # A save reads only: the cache is unchanged.
    for a, b in zip(ours.storages(), ref.storages()):
        assert torch.equal(a, b)


@SETTINGS
@given(case_params)
def test_scatter_matches_naive_oracle(p):
    kw, skip = _case_from(p)
    ours, ref = Case(**kw), Case(**kw)
    scatter(ours.paged, ours.mapping, ours.chunks, skip, layers=_lrange(p))
    naive_scatter(ref.layers, ref.kind, ref.BS, ref.mapping, ref.chunks4, skip, _lrange(p))
    # Whole storages, padding and neighbouring layers included, are byte-identical.
    for a, b in zip(ours.storages(), ref.storages()):
        assert torch.equal(a, b)
    for a, b in zip(ours.chunks4, ref.chunks4):  # a load does not write its source
        assert _eq_bytes(a, b)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_round_trip(kind, dtype):
    src = Case(kind, dtype, L=3, NB=20, BS=4, H=2, D=8, T=16, n_chunks=3, hole_p=0.15, seed=1)
    dst = Case(kind, dtype, L=3, NB=20, BS=4, H=2, D=8, T=16, n_chunks=3, hole_p=0.15, seed=2)
    before = [s.clone() for s in dst.storages()]
    skip = 5
    gather(src.paged, src.mapping, src.chunks, skip)
    # The same tokens land in other slots of another cache (dst.mapping, same holes pattern not needed).
    m = src.mapping.clone()
    perm = torch.randperm(dst.NB * dst.BS, generator=torch.Generator().manual_seed(3))[: m.numel()]
    m2 = torch.where(m >= 0, perm, torch.full_like(m, -1))
    scatter(dst.paged, m2, src.chunks, skip)
    moved = 0
    for t in range(src.n):
        if t < skip or m[t] < 0:
            continue
        for l in range(3):
            for kv in range(src.nkv):
                a = row(src.layers[l], kind, kv, int(m[t]), 4)
                b = row(dst.layers[l], kind, kv, int(m2[t]), 4)
                assert _eq_bytes(a, b)
                moved += 1
    assert moved > 0
    # Gathering back from dst gives the same chunks.
    back = [torch.empty_like(c) for c in src.chunks]
    gather(dst.paged, m2, back, skip)
    for a, b in zip(back, src.chunks):
        assert _eq_bytes(a, b)
    # Slots not in m2 are untouched.
    owned = owned_slots(m2, src.n, skip)
    snap = [s.clone() for s in before]
    for l, layer in enumerate(dst.layers):
        ref_layer = snap[l].view(dst.paged.dtype).view(layer.shape) if layer._base is None else None
        if ref_layer is None:
            continue
        for kv in range(dst.nkv):
            for s in range(dst.NB * dst.BS):
                if s not in owned:
                    assert _eq_bytes(row(layer, kind, kv, s, 4), row(ref_layer, kind, kv, s, 4))


# ---------------------------------------------------------------------- the invariant
@pytest.mark.parametrize("kind,variant,H", [(k, v, h) for k in KINDS for v in _variants(k)
                                             for h in ((1, 2, 4) if k in ("cpu", "kv_split") else (2,))])
def test_scatter_touches_only_owned_slots_every_skip(kind, variant, H):
    """Sentinel cache; a load with holes and every skip 0..T-1 writes only owned slots."""
    T = 16
    dtype = torch.bfloat16
    for skip in range(T):
        c = Case(kind, dtype, L=2, NB=14, BS=4, H=H, D=4, T=T, n_chunks=2, hole_p=0.25, seed=100 + skip,
                 variant=variant, map_extra=8)
        # Sentinel: a fixed byte pattern distinct from the random chunk data's distribution.
        for s in c.storages():
            s.copy_((torch.arange(s.numel()) * 7 + 0x5A).to(torch.uint8))
        before = [s.clone() for s in c.storages()]
        rows_before = {k: v.clone() for k, v in all_rows(c.layers, kind, c.BS, c.NB).items()}
        scatter(c.paged, c.mapping, c.chunks, skip)
        m = c.mapping.tolist()
        owned = {}  # slot -> token
        for t in range(c.n):  # tokens past the chunks (map_extra) are never owned
            if t >= skip and m[t] >= 0:
                owned[m[t]] = t
        changed = 0
        for (l, kv, s), r in all_rows(c.layers, kind, c.BS, c.NB).items():
            if s in owned:
                tok = owned[s]
                assert _eq_bytes(r, c.chunks4[tok // T][kv, l, tok % T]), (skip, l, kv, s)
                changed += 1
            else:
                assert _eq_bytes(r, rows_before[(l, kv, s)]), f"skip={skip}: slot {s} not owned but written"
        assert changed == len(owned) * 2 * c.nkv
        # Nothing outside the rows moved either (padding, gaps between layers).
        if variant == "padded":
            for a, b in zip(c.storages(), before):
                diff = (a != b).nonzero().numel()
                assert diff <= len(owned) * 2 * c.nkv * c.W * 2


def test_mapping_past_the_chunks_is_ignored():
    c = Case("flash", torch.float16, NB=16, BS=4, T=8, n_chunks=2, hole_p=0.0, map_extra=20, seed=9)
    extra = set(c.mapping[c.n:].tolist())
    before = {k: v.clone() for k, v in all_rows(c.layers, "flash", 4, 16).items()}
    scatter(c.paged, c.mapping, c.chunks)
    after = all_rows(c.layers, "flash", 4, 16)
    for (l, kv, s), r in after.items():
        if s in extra:
            assert _eq_bytes(r, before[(l, kv, s)])


def test_int32_mapping_and_raw_chunks_equal_typed():
    a = Case("blocks_first", torch.bfloat16, T=8, n_chunks=3, NB=8, BS=4, map_dtype=torch.int32, seed=4)
    b = Case("blocks_first", torch.bfloat16, T=8, n_chunks=3, NB=8, BS=4, seed=4, raw=True)
    assert torch.equal(a.mapping.long(), b.mapping)
    gather(a.paged, a.mapping, a.chunks, 3)
    gather(b.paged, b.mapping, b.chunks, 3)
    for x, y in zip(a.chunks4, b.chunks4):
        assert _eq_bytes(x, y)
    assert b.chunks[0].dtype == torch.uint8 and b.chunks[0].dim() == 1


def test_gather_zeroes_rows_not_moved():
    c = Case("cpu", torch.float32, T=8, n_chunks=2, NB=6, BS=4, hole_p=0.0, seed=5)
    c.mapping[10] = -1
    gather(c.paged, c.mapping, c.chunks, 3)
    ch = c.chunks4
    assert torch.count_nonzero(as_int(ch[0][:, :, :3])) == 0
    assert torch.count_nonzero(as_int(ch[1][:, :, 2])) == 0
    assert _eq_bytes(ch[0][1, 0, 3], row(c.layers[0], "cpu", 1, int(c.mapping[3]), 4))


# ---------------------------------------------------------------------- vLLM 0.32's CPU layout
@pytest.mark.parametrize("H", [1, 2, 4])
@pytest.mark.parametrize("variant", _variants("cpu"))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_cpu_layout_every_head_count_vs_oracle(H, variant, dtype):
    """The real cpu layout ([NB, H, BS, 2*D], memory [NB, H, 2, BS, D]) both ways, every skip."""
    kw = dict(kind="cpu", dtype=dtype, L=3, NB=12, BS=4, H=H, D=8, T=8, n_chunks=3, hole_p=0.2, variant=variant)
    for skip in range(8):
        ours, ref = Case(**kw, seed=skip), Case(**kw, seed=skip)
        assert ours.paged.kind == "cpu" and ours.paged.num_pieces == H
        gather(ours.paged, ours.mapping, ours.chunks, skip)
        naive_gather(ref.layers, "cpu", ref.BS, ref.mapping, ref.chunks4, skip)
        assert all(_eq_bytes(a, b) for a, b in zip(ours.chunks4, ref.chunks4))
        ours, ref = Case(**kw, seed=skip), Case(**kw, seed=skip)
        scatter(ours.paged, ours.mapping, ours.chunks, skip)
        naive_scatter(ref.layers, "cpu", ref.BS, ref.mapping, ref.chunks4, skip)
        assert all(torch.equal(a, b) for a, b in zip(ours.storages(), ref.storages()))


def _vllm_caches(L, NB, BS, H, D, dtype, layout="LBHNC"):
    """Per-layer KV caches built by vLLM's own code (``create_kv_cache_views``), in ``layout``:
    LBHNC is what its CPU model runner uses; LBNHC, LBHNC, BLNHC are GPU layouts."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheTensor, create_kv_cache_views
    from vllm.v1.kv_cache_layout import KVCacheLayout

    spec = FullAttentionSpec(block_size=BS, num_kv_heads=H, head_size=D, dtype=dtype)
    page = spec.page_size_bytes
    names = [f"model.layers.{i}.self_attn.attn" for i in range(L)]
    raw = torch.zeros(page * NB * L, dtype=torch.int8)
    lay = KVCacheLayout[layout]
    layer_stride, block_stride = (page * NB, page) if lay.is_layer_compact else (page, page * L)
    tensor = KVCacheTensor(size=raw.numel(), layers=names, layer_stride=layer_stride, block_stride=block_stride)
    views = create_kv_cache_views(raw, spec, NB, lay, tensor)
    return dict(zip(names, views))


def _vllm_reader(kind, cache, D):
    """(key_cache, value_cache) indexed [blk, h, off] exactly as vLLM 0.32's attention reads the layer."""
    if kind == "cpu":  # cpu_attn.py
        nb, nh, bs, _ = cache.size()
        return cache.view((nb, nh, bs * 2, -1)).chunk(2, dim=2)
    k, v = cache.transpose(1, 2).split(D, dim=-1)  # flash_attn.py (and FlashInfer, Triton, Flex): [NB, BS, H, D]
    return k.transpose(1, 2), v.transpose(1, 2)


@pytest.mark.parametrize("kind,layout", [("cpu", "LBHNC"), ("kv_split", "LBNHC"), ("kv_split", "LBHNC"),
                                         ("kv_split", "BLNHC")])
@pytest.mark.parametrize("H", [1, 2, 4])
def test_scatter_lands_where_vllm_attention_reads(kind, layout, H):
    """A cache built by vLLM itself; each scattered token's K and V are read back through vLLM's view
    (its CPU backend's for ``cpu``, its GPU backends' for ``kv_split``, built here on CPU tensors)."""
    pytest.importorskip("vllm")
    L, NB, BS, D, T = 2, 6, 32, 16, 32
    caches = _vllm_caches(L, NB, BS, H, D, torch.float32, layout)
    first = next(iter(caches.values()))
    assert tuple(first.shape) == (NB, H, BS, 2 * D)
    paged = PagedKV.from_vllm(caches, kind=None if kind == "cpu" else kind, block_size=BS)
    assert paged.kind == kind and paged.num_layers == L
    # Token t of chunk c has K = 1000*(layer+1) + 100*t + h and V = -K (per head h, all D elements).
    n_chunks = 2
    chunks = []
    for c in range(n_chunks):
        k = torch.empty(L, T, H, D)
        for l in range(L):
            for t in range(T):
                for h in range(H):
                    k[l, t, h] = 1000 * (l + 1) + 100 * (c * T + t) + h
        chunks.append(torch.stack([k, -k]).reshape(2, L, T, H * D).contiguous())
    gen = torch.Generator().manual_seed(H)
    mapping = torch.randperm(NB * BS, generator=gen)[: n_chunks * T]
    mapping[5] = -1
    skip = 3
    scatter(paged, mapping, chunks, skip)
    for l, cache in enumerate(caches.values()):
        key_cache, value_cache = _vllm_reader(kind, cache, D)
        written = 0
        for s in range(NB * BS):
            blk, off = divmod(s, BS)
            tok = (mapping == s).nonzero()
            if tok.numel() and int(tok) >= skip:
                t = int(tok)
                for h in range(H):
                    want = 1000 * (l + 1) + 100 * t + h
                    assert (key_cache[blk, h, off] == want).all(), (l, t, h)
                    assert (value_cache[blk, h, off] == -want).all(), (l, t, h)
                written += 1
            else:
                assert (key_cache[blk, :, off] == 0).all() and (value_cache[blk, :, off] == 0).all(), s
        assert written == n_chunks * T - skip - (1 if 5 >= skip else 0)
    # And gather reads back exactly what was written.
    back = [torch.empty_like(c) for c in chunks]
    gather(paged, mapping, back, skip)
    for c, b in zip(chunks, back):
        for t in range(T):
            if c is chunks[0] and (t < skip or t == 5):
                assert (b[:, :, t] == 0).all()
            else:
                assert torch.equal(b[:, :, t], c[:, :, t])


# ---------------------------------------------------------------------- description and errors
def test_detect_each_layout():
    assert detect(torch.empty(2, 5, 16, 8, 64)) == "flash"
    assert detect(torch.empty(5, 2, 16, 8, 64)) == "blocks_first"
    assert detect(torch.empty(5, 8, 16, 128)) == "cpu"
    assert detect(torch.empty(5, 2, 16, 128), block_size=16) == "cpu"
    # The same shape off the CPU is vLLM 0.32's GPU layout (K and V split in the last dim).
    assert detect(torch.empty(5, 8, 16, 128, device="meta")) == "kv_split"
    with pytest.raises(LayoutError, match="matches no known layout"):
        detect(torch.empty(5, 8, 16, 127))
    with pytest.raises(LayoutError, match="matches no known layout"):
        detect(torch.empty(5, 8, 16, 128), block_size=32)
    assert detect(torch.empty(5, 16, 576)) == "mla"
    with pytest.raises(LayoutError, match="ambiguous"):
        detect(torch.empty(2, 2, 16, 8, 64))
    with pytest.raises(LayoutError, match="ambiguous"):
        detect(torch.empty(2, 2, 16, 8, 64), block_size=16)
    assert PagedKV([torch.empty(2, 2, 16, 8, 64)], "blocks_first").kind == "blocks_first"
    with pytest.raises(LayoutError, match="matches no known layout"):
        detect(torch.empty(4, 4))


def test_paged_description_fields():
    p = PagedKV([torch.empty(2, 5, 16, 8, 64) for _ in range(3)], "flash", 16)
    assert (p.num_layers, p.num_blocks, p.block_size, p.width, p.num_kv) == (3, 5, 16, 512, 2)
    assert (p.block_stride, p.kv_stride, p.token_stride) == (16 * 512, 5 * 16 * 512, 512)
    q = PagedKV([torch.empty(5, 2, 16, 8, 64)], None, 16)
    assert q.kind == "blocks_first" and (q.block_stride, q.kv_stride) == (2 * 16 * 512, 16 * 512)
    m = PagedKV([torch.empty(7, 16, 576, dtype=torch.bfloat16)] * 2, "mla")
    assert m.mla and m.chunk_shape(256) == (2, 256, 576)
    assert m.row_contiguous and (m.num_pieces, m.piece_size, m.piece_stride) == (1, 576, 576)
    c = PagedKV([torch.empty(5, 8, 16, 2 * 64)], None, 16)  # vLLM CPU: memory [NB, H, 2, BS, D]
    assert c.kind == "cpu" and (c.num_blocks, c.block_size, c.width, c.num_kv) == (5, 16, 512, 2)
    assert (c.block_stride, c.kv_stride, c.token_stride) == (8 * 16 * 128, 16 * 64, 64)
    assert (c.num_pieces, c.piece_size, c.piece_stride) == (8, 64, 2 * 16 * 64) and not c.row_contiguous
    assert c.chunk_shape(256) == (2, 1, 256, 512)
    c1 = PagedKV([torch.empty(5, 1, 16, 2 * 64)], "cpu")
    assert c1.row_contiguous and c1.width == 64
    lay = m.chunk_layout(256)
    assert lay.mla and lay.shape == (2, 256, 576) and lay.nbytes == m.chunk_nbytes(256) == 2 * 256 * 576 * 2


@pytest.mark.parametrize("layers,kind,bs,msg", [
    ([torch.empty(2, 5, 16, 8, 64)], "blocks_first", None, "expects 2"),
    ([torch.empty(2, 5, 16, 8, 64)], "cpu", None, "4-dim"),
    ([torch.empty(2, 5, 16, 8, 64)], "flash", 32, "block_size=32"),
    ([torch.empty(2, 5, 16, 8, 64), torch.empty(2, 6, 16, 8, 64)], "flash", None, "layer 1"),
    ([torch.empty(2, 5, 16, 8, 64), torch.empty(2, 5, 16, 8, 64, dtype=torch.float16)], "flash", None, "layer 1"),
    ([torch.empty(5, 2, 8, 16, 64).transpose(2, 3)], "blocks_first", 16, "not contiguous"),
    ([torch.empty(5, 8, 128, 16).transpose(2, 3)], "cpu", None, "not contiguous"),
    ([torch.empty(5, 8, 16, 127)], "cpu", None, "even"),
    ([torch.empty(5, 8, 16, 128)], "cpu", 32, "block_size=32"),
    ([torch.empty(2, 5, 16, 8, 64)], "paged", None, "unknown KV layout"),
    ([], "flash", None, "at least one"),
])
def test_paged_errors_say_what_is_wrong(layers, kind, bs, msg):
    with pytest.raises(LayoutError, match=msg):
        PagedKV(layers, kind, bs)


def test_call_errors_say_what_is_wrong():
    c = Case("flash", torch.bfloat16, T=8, n_chunks=2, NB=8, BS=4, seed=6)
    with pytest.raises(ValueError, match="cover 16 tokens"):
        scatter(c.paged, c.mapping[:15], c.chunks)
    with pytest.raises(ValueError, match="skip_prefix_n_tokens"):
        scatter(c.paged, c.mapping, c.chunks, 8)
    with pytest.raises(ValueError, match="skip_prefix_n_tokens"):
        scatter(c.paged, c.mapping, c.chunks, -1)
    with pytest.raises(ValueError, match="dtype"):
        scatter(c.paged, c.mapping, [x.float() for x in c.chunks])
    with pytest.raises(ValueError, match="same size"):
        scatter(c.paged, c.mapping, [c.chunks[0], c.chunks[1][:, :, :4].contiguous()])
    with pytest.raises(ValueError, match="whole number of tokens"):
        scatter(c.paged, c.mapping, [c.chunks[0].view(-1).view(torch.uint8)[:-2]])
    with pytest.raises(ValueError, match="no chunk"):
        scatter(c.paged, c.mapping, [])
    bad = c.mapping.clone()
    bad[3] = 8 * 4
    with pytest.raises(ValueError, match="only 32 slots"):
        scatter(c.paged, bad, c.chunks)
    with pytest.raises(ValueError, match="int64"):
        scatter(c.paged, c.mapping.float(), c.chunks)
    for bad_layers in ((1, 1), (0, c.paged.num_layers + 1), (-1, 1), "ab"):
        with pytest.raises(ValueError, match="layers"):
            scatter(c.paged, c.mapping, c.chunks, layers=bad_layers)


def test_from_vllm_orders_by_layer_index_and_dedups():
    ts = [torch.full((2, 3, 4, 1, 8), float(i)) for i in range(12)]
    names = {f"model.layers.{i}.self_attn.attn": ts[i] for i in (3, 11, 0, 7, 1, 2, 10, 4, 5, 6, 8, 9)}
    p = PagedKV.from_vllm(names)
    assert p.kind == "flash" and p.num_layers == 12 and p.block_size == 4
    assert [int(t[0, 0, 0, 0, 0]) for t in p.layers] == list(range(12))
    shared = {"a.layers.0.attn": ts[0], "a.layers.1.attn": ts[0], "a.layers.2.attn": ts[2]}
    assert PagedKV.from_vllm(shared).num_layers == 2
    with pytest.raises(LayoutError):
        PagedKV.from_vllm({})


def test_backend_dispatch_on_cpu_is_torch():
    from kvtier.transfer import backend_for

    c = Case("mla", torch.float16, seed=7)
    assert backend_for(c.paged) is torch_ref
    assert backend_for(Case("cpu", torch.float16, H=4, seed=7).paged) is torch_ref
    with pytest.raises(ValueError, match="unknown backend"):
        backend_for(c.paged, "cuda-magic")


# ---------------------------------------------------------------------- Triton kernels, interpreted on CPU
_INTERP_SCRIPT = r"""
import sys, torch
sys.path.insert(0, sys.argv[1])
import test_transfer as tt
from kvtier.transfer import triton_kernels as tk, torch_ref
assert tk.available()
n = 0
from kvtier.transfer import LayoutError
for kind in tt.KINDS:
    if kind == "cpu":  # token rows in pieces (H > 1): the Triton backend refuses them, clearly
        c = tt.Case(kind="cpu", dtype=torch.float32, H=2)
        for f in (tk.gather, tk.scatter):
            try:
                f(c.paged, c.mapping, c.chunks)
                raise AssertionError("Triton backend accepted the cpu layout")
            except LayoutError as e:
                assert "backend='torch'" in str(e)
        continue
    for dtype in (torch.bfloat16, torch.float32, torch.float8_e4m3fn):
        # direct kernel; one piece of 3 whole chunks; pieces of one (kv, layer) pair of a chunk;
        # a large ring whose saves still go in pieces of one pair (save_piece_bytes; staged on GPUs only)
        for mode, stage, pieces, save_piece in (("uva", 32 << 20, 1, 1 << 30), ("staged", 1 << 30, 1, 1 << 30),
                                                ("staged", 1, 3, 1 << 30), ("staged", 1 << 30, 1, 1)):
            tk.configure(staging_bytes=stage, min_pieces=pieces, save_piece_bytes=save_piece)
            kw = dict(kind=kind, dtype=dtype, L=3, NB=14, BS=4, H=2, D=8, T=8, n_chunks=3, hole_p=0.2, seed=n)
            skip = n % 8
            for lr in (None, (1, 2), (0, 2)):  # all layers; one layer (a layer-wise call); a range
                a, b = tt.Case(**kw), tt.Case(**kw)
                tk.gather(a.paged, a.mapping, a.chunks, skip, mode=mode, layers=lr).wait()
                torch_ref.gather(b.paged, b.mapping, b.chunks, skip, layers=lr)
                assert all(tt._eq_bytes(x, y) for x, y in zip(a.chunks4, b.chunks4)), ("gather", kind, dtype, mode, lr)
                a, b = tt.Case(**kw), tt.Case(**kw)
                tk.scatter(a.paged, a.mapping, a.chunks, skip, mode=mode, layers=lr).wait()
                torch_ref.scatter(b.paged, b.mapping, b.chunks, skip, layers=lr)
                assert all(torch.equal(x, y) for x, y in zip(a.storages(), b.storages())), (
                    "scatter", kind, dtype, mode, lr)
                n += 1
print("OK", n)
"""


def test_triton_kernels_interpreted_on_cpu():
    """The Triton kernels (both modes, pieces forced small) under TRITON_INTERPRET=1 equal torch_ref.

    The cpu layout (rows in H pieces) is refused by the Triton backend with a LayoutError.
    """
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = Path(__file__).resolve().parent.parent
    env["PYTHONPATH"] = str(root) + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-c", _INTERP_SCRIPT, str(Path(__file__).parent)], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "OK 144" in r.stdout


def test_torch_ref_reuses_a_plan_only_for_the_same_unchanged_mapping():
    """Layer-wise calls reuse the last plan; a mapping changed in place gets a new one."""
    a, b = Case("flash", torch.float32, L=2, seed=3), Case("flash", torch.float32, L=2, seed=3)
    m = a.mapping.clone()
    scatter(a.paged, m, a.chunks, layers=(0, 1))
    m[:] = m.flip(0)  # in place: same tensor object, new contents
    scatter(a.paged, m, a.chunks, layers=(1, 2))
    naive_scatter(b.layers, "flash", b.BS, b.mapping, b.chunks4, 0, (0, 1))
    naive_scatter(b.layers, "flash", b.BS, b.mapping.flip(0), b.chunks4, 0, (1, 2))
    assert all(torch.equal(x, y) for x, y in zip(a.storages(), b.storages()))


def test_layer_wise_calls_with_an_inference_mode_mapping():
    """vLLM's worker runs under torch.inference_mode(): its slot mappings are inference tensors
    (no version counter). Layer-wise calls with one must work and equal the oracle."""
    a, b = Case("cpu", torch.float32, L=3, H=2, seed=4), Case("cpu", torch.float32, L=3, H=2, seed=4)
    with torch.inference_mode():
        m = a.mapping.clone()
        for layer in range(3):
            scatter(a.paged, m, a.chunks, 2, layers=(layer, layer + 1))
    naive_scatter(b.layers, "cpu", b.BS, b.mapping, b.chunks4, 2)
    assert all(torch.equal(x, y) for x, y in zip(a.storages(), b.storages()))


@pytest.mark.parametrize("kind,variant", [(k, v) for k in KINDS for v in _variants(k)])
@pytest.mark.parametrize("lrange", [None, (1, 2)])
def test_whole_block_mappings_equal_the_oracle(kind, variant, lrange):
    """The connector's mappings: each chunk is whole blocks in order (a host cache then moves one
    run of memory per block). Chunk 1's tokens are reversed (no runs): both paths in one call."""
    kw = dict(kind=kind, dtype=torch.bfloat16, L=3, NB=16, BS=4, H=2, D=8, T=8, n_chunks=3, hole_p=0.0,
              variant=variant)
    a, b = Case(seed=5, **kw), Case(seed=5, **kw)
    blocks = torch.randperm(a.NB, generator=torch.Generator().manual_seed(6))[:a.n // a.BS]
    m = (blocks.view(-1, 1) * a.BS + torch.arange(a.BS)).reshape(-1)
    m[a.T:2 * a.T] = m[a.T:2 * a.T].flip(0).clone()
    scatter(a.paged, m, a.chunks, 0, layers=lrange)
    naive_scatter(b.layers, kind, b.BS, m, b.chunks4, 0, lrange)
    assert all(torch.equal(x, y) for x, y in zip(a.storages(), b.storages()))
    outs = [torch.zeros_like(c) for c in a.chunks]
    refs = [torch.zeros_like(c) for c in a.chunks4]
    gather(a.paged, m, outs, 0, layers=lrange)
    naive_gather(b.layers, kind, b.BS, m, refs, 0, lrange)
    assert all(_eq_bytes(x, y) for x, y in zip(outs, refs))
