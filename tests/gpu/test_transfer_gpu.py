"""Triton transfer kernels on a CUDA GPU vs the torch reference (run on CPU copies).

Same cases as tests/test_transfer.py (its oracle helpers are imported), for
both host paths ("staged": GPU gather + copy-engine DMA, "uva": zero-copy),
pinned host chunks and device chunks, and the sentinel invariant for every
skip value, for every layout the GPU backend moves (``kv_split`` -- vLLM 0.32's
GPU layout, token rows in one piece per head -- included). The ``cpu`` layout
(vLLM's CPU backend) only exists on CPU: the Triton backend refuses it with a LayoutError, and a
``cpu``-kind cache forced onto CUDA goes to torch_ref. Skipped cleanly where
no GPU or no Triton is present.
"""

from __future__ import annotations

import sys
import zlib
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import test_transfer as tt  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
triton = pytest.importorskip("triton") if torch.cuda.is_available() else None

from kvtier.transfer import LayoutError, PagedKV, backend_for, gather, scatter, torch_ref  # noqa: E402

MODES = ["staged", "uva"]
TRITON_KINDS = [k for k in tt.KINDS if k != "cpu"]  # contiguous token rows


def _tk():
    from kvtier.transfer import triton_kernels

    return triton_kernels


def _pair(kw, where):
    """(GPU case with chunks `where`, CPU case with identical bytes)."""
    g, c = tt.Case(**kw, device="cuda"), tt.Case(**kw)
    if where == "pinned":
        g.chunks = [x.cpu().pin_memory() for x in g.chunks]
        g.chunks4 = [x.view(g.paged.dtype).view(g.nkv, g.paged.num_layers, g.T, g.W) for x in g.chunks]
    return g, c


@pytest.fixture(autouse=True)
def _small_pieces():
    _tk().configure(staging_bytes=32 << 20, staging_slots=2, min_pieces=4)
    yield
    _tk().configure(staging_bytes=32 << 20, staging_slots=2, min_pieces=4, save_piece_bytes=8 << 20)


def test_dispatch_picks_triton():
    g, _ = _pair(dict(kind="flash", dtype=torch.bfloat16), "pinned")
    assert backend_for(g.paged) is _tk()


@pytest.mark.parametrize("H", [1, 2, 4])
def test_cpu_kind_on_cuda_goes_to_torch_and_triton_refuses_pieces(H):
    kw = dict(kind="cpu", dtype=torch.bfloat16, L=2, NB=12, BS=4, H=H, D=8, T=8, n_chunks=2, hole_p=0.2, seed=H)
    g, c = _pair(kw, "pinned")
    if H > 1:
        assert backend_for(g.paged) is torch_ref
        with pytest.raises(LayoutError, match="backend='torch'"):
            scatter(g.paged, g.mapping, g.chunks, backend="triton")
    scatter(g.paged, g.mapping, g.chunks, 3).wait()
    torch_ref.scatter(c.paged, c.mapping, c.chunks, 3)
    for a, b in zip(g.storages(), c.storages()):
        assert torch.equal(a.cpu(), b)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("where", ["pinned", "device"])
@pytest.mark.parametrize("kind,variant", [(k, v) for k in TRITON_KINDS for v in tt._variants(k)])
@pytest.mark.parametrize("dtype", tt.DTYPES, ids=str)
def test_equal_to_torch_ref(mode, where, kind, variant, dtype):
    kw = dict(kind=kind, dtype=dtype, L=3, NB=40, BS=4, H=2, D=16, T=16, n_chunks=5, hole_p=0.2,
              seed=zlib.crc32(f"{mode}{where}{kind}{variant}{dtype}".encode()) % 1000, variant=variant, raw=where == "pinned")
    for skip in (0, 7, 15):
        g, c = _pair(kw, where)
        gather(g.paged, g.mapping, g.chunks, skip, mode=mode, backend="triton").wait()
        torch_ref.gather(c.paged, c.mapping, c.chunks, skip)
        for a, b in zip(g.chunks4, c.chunks4):
            assert tt._eq_bytes(a, b)
        g, c = _pair(kw, where)
        scatter(g.paged, g.mapping, g.chunks, skip, mode=mode, backend="triton").wait()
        torch_ref.scatter(c.paged, c.mapping, c.chunks, skip)
        for a, b in zip(g.storages(), c.storages()):
            assert torch.equal(a.cpu(), b)


def test_save_pieces_capped_and_loads_not():
    """A save's pieces stay within save_piece_bytes, so that the engine's copy of the sampled tokens
    to the host never queues behind more than two of them; a load fills the ring's slots."""
    kw = dict(kind="flash", dtype=torch.bfloat16, L=3, NB=40, BS=4, H=2, D=16, T=16, n_chunks=5, hole_p=0.2, seed=7)
    g, c = _pair(kw, "pinned")
    pair = g.T * g.paged.width * g.paged.itemsize
    _tk().configure(staging_bytes=32 << 20, min_pieces=1, save_piece_bytes=pair)
    gather(g.paged, g.mapping, g.chunks, 0, mode="staged", backend="triton").wait()
    torch_ref.gather(c.paged, c.mapping, c.chunks, 0)
    assert all(tt._eq_bytes(a, b) for a, b in zip(g.chunks4, c.chunks4))
    cut = [p for ps in g.paged.__dict__["_kvtier_pieces"].values() for p in ps]
    assert cut and all(c1 - c0 == 1 and npairs == 1 for c0, c1, _, npairs in cut), cut
    g.paged.__dict__["_kvtier_pieces"].clear()
    scatter(g.paged, g.mapping, g.chunks, 0, mode="staged", backend="triton").wait()
    (load,) = g.paged.__dict__["_kvtier_pieces"].values()
    assert len(load) < len(cut) and any(c1 - c0 > 1 or npairs > 1 for c0, c1, _, npairs in load), load


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", TRITON_KINDS)
def test_sentinel_every_skip(mode, kind):
    T = 16
    for skip in range(T):
        g, _ = _pair(dict(kind=kind, dtype=torch.bfloat16, L=2, NB=14, BS=4, H=2, D=8, T=T, n_chunks=2,
                          hole_p=0.25, seed=200 + skip, variant="one_buffer", map_extra=8), "pinned")
        for s in g.storages():
            s.copy_((torch.arange(s.numel(), device="cuda") * 7 + 0x5A).to(torch.uint8))
        stor = {x.data_ptr(): x for x in g.storages()}  # layers may share one allocation
        before = {k: x.clone() for k, x in stor.items()}
        scatter(g.paged, g.mapping, g.chunks, skip, mode=mode).wait()
        owned = {}
        m = g.mapping.tolist()
        for t in range(g.n):
            if t >= skip and m[t] >= 0:
                owned[m[t]] = t
        # Expected: sentinel everywhere but owned rows, which hold the chunk rows.
        exp_layers = [before[b.data_ptr()].view(g.paged.dtype).as_strided(l.size(), l.stride(), l.storage_offset())
                      for b, l in zip(g.storages(), g.layers)]
        for (l, kv, s), r in tt.all_rows(exp_layers, kind, g.BS, g.NB).items():
            if s in owned:
                tok = owned[s]
                tt.put_row(r, g.chunks4[tok // T][kv, l, tok % T].to("cuda"))
        for k, a in stor.items():
            assert torch.equal(a, before[k]), f"skip={skip}: bytes outside the owned slots changed"


@pytest.mark.parametrize("mode", MODES)
def test_llama_shape_many_pieces(mode):
    """Llama-3.1-8B geometry (32 layers, 8x128, bf16, block 16, chunk 256), whole random blocks."""
    L, NB, BS, T, C = 32, 300, 16, 256, 9
    gen = torch.Generator().manual_seed(0)
    layers = [tt.random_bytes((2, NB, BS, 8, 128), torch.bfloat16, gen, "cuda") for _ in range(L)]
    paged = PagedKV(layers, "flash", BS)
    blocks = torch.randperm(NB, generator=gen)[: C * T // BS]
    mapping = (blocks[:, None] * BS + torch.arange(BS)).reshape(-1)
    chunks = [torch.empty(paged.chunk_nbytes(T), dtype=torch.uint8).pin_memory() for _ in range(C)]
    _tk().configure(staging_bytes=8 << 20, min_pieces=4)  # 32 MiB chunks -> 4 pieces each
    gather(paged, mapping, chunks, 0, mode=mode).wait()
    cpu = PagedKV([x.cpu() for x in layers], "flash", BS)
    ref = [torch.empty_like(x, device="cpu", pin_memory=False) for x in chunks]
    torch_ref.gather(cpu, mapping, ref)
    for a, b in zip(chunks, ref):
        assert torch.equal(a, b)
    for x in layers:
        x.zero_()
    scatter(paged, mapping, chunks, 100, mode=mode).wait()
    got = torch.stack([x for x in layers]).cpu()
    exp = [torch.zeros_like(x) for x in cpu.layers]
    torch_ref.scatter(PagedKV(exp, "flash", BS), mapping, chunks, 100)
    assert torch.equal(tt.as_int(got), tt.as_int(torch.stack(exp)))


def test_streams_order_after_caller_work():
    """gather sees writes queued on the caller's stream; scatter + wait_on orders later reads."""
    g, _ = _pair(dict(kind="flash", dtype=torch.float16, L=2, NB=64, BS=16, H=8, D=128, T=256, n_chunks=2,
                      hole_p=0.0), "pinned")
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        torch.cuda._sleep(50_000_000)  # keep the stream busy, so an unordered gather would see old data
        for x in g.layers:
            x.fill_(3.0)
        t = gather(g.paged, g.mapping, g.chunks, stream=s)
    t.wait()
    assert all(bool((c.view(torch.float16) == 3.0).all()) for c in g.chunks)
    for c in g.chunks:
        c.view(torch.float16).fill_(5.0)
    with torch.cuda.stream(s):
        t = scatter(g.paged, g.mapping, g.chunks, stream=s)
        t.wait_on(s)
        total = sum(x.double().sum() for x in g.layers)
    s.synchronize()
    n_rows = g.n * 2 * 2  # tokens x K/V x layers
    assert float(total) == 5.0 * n_rows * g.W + 3.0 * (2 * 64 * 16 * g.W * 2 - n_rows * g.W)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("where", ["pinned", "device"])
@pytest.mark.parametrize("kind", ["flash", "kv_split", "mla"])
def test_layer_ranges_equal_to_torch_ref(mode, where, kind):
    """layers=(lo, hi): a layer-wise call moves those layers only, in both directions."""
    kw = dict(kind=kind, dtype=torch.bfloat16, L=3, NB=40, BS=4, H=2, D=16, T=16, n_chunks=5, hole_p=0.2,
              seed=11, raw=where == "pinned")
    for lr in ((0, 1), (1, 2), (2, 3), (0, 2), (1, 3)):
        g, c = _pair(kw, where)
        gather(g.paged, g.mapping, g.chunks, 3, mode=mode, backend="triton", layers=lr).wait()
        torch_ref.gather(c.paged, c.mapping, c.chunks, 3, layers=lr)
        for a, b in zip(g.chunks4, c.chunks4):
            assert tt._eq_bytes(a, b), lr
        g, c = _pair(kw, where)
        scatter(g.paged, g.mapping, g.chunks, 3, mode=mode, backend="triton", layers=lr).wait()
        torch_ref.scatter(c.paged, c.mapping, c.chunks, 3, layers=lr)
        for a, b in zip(g.storages(), c.storages()):
            assert torch.equal(a.cpu(), b), lr


class _CountingJit:
    """Stands in for the @triton.jit kernel and counts launches that go through Triton's binder."""

    def __init__(self, kernel):
        self.kernel, self.n = kernel, 0

    def __getitem__(self, grid):
        self.n += 1
        return self.kernel[grid]


@pytest.mark.parametrize("mode", MODES)
def test_direct_launch_equals_jit_for_each_specialisation(mode, monkeypatch):
    """Compiled kernels launched directly (no Triton binder) move the same bytes as the JIT path,
    for slot mappings of both int widths, a misaligned mapping view, pinned and device chunks;
    a repeated call launches only directly."""
    tk = _tk()
    counting = _CountingJit(tk._kv_copy)
    monkeypatch.setattr(tk, "_kv_copy", counting)
    kw = dict(kind="flash", dtype=torch.float16, L=2, NB=48, BS=4, H=2, D=16, T=16, n_chunks=4, hole_p=0.2,
              seed=5, map_extra=1)
    results = {}
    for direct in (False, True):
        monkeypatch.setitem(tk._DIRECT, "on", direct)
        tk._COMPILED.clear()
        for where in ("pinned", "device"):
            for variant in ("int64", "int32", "misaligned"):
                g, _ = _pair(kw, where)
                m = g.mapping.to("cuda")
                if variant == "int32":
                    m = m.to(torch.int32)
                elif variant == "misaligned":  # a view starting 8 bytes into its allocation
                    m = torch.cat([m[:1], m])[1:]
                    assert m.data_ptr() % 16
                for rep in range(2):
                    before = counting.n
                    gather(g.paged, m, g.chunks, 5, mode=mode).wait()
                    if direct and rep == 1:
                        assert counting.n == before, "a repeated call went through Triton's binder"
                results[(direct, where, variant, "gather")] = [tt.as_int(x).cpu().clone() for x in g.chunks]
                g, _ = _pair(kw, where)
                scatter(g.paged, m, g.chunks, 5, mode=mode).wait()
                results[(direct, where, variant, "scatter")] = [x.cpu().clone() for x in g.storages()]
        if direct:
            assert tk._COMPILED, "no compiled kernel was cached for direct launches"
    for key, value in results.items():
        if key[0]:
            jit = results[(False,) + key[1:]]
            assert all(torch.equal(a, b) for a, b in zip(value, jit)), key
