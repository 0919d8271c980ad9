"""The connector's worker on a CUDA cache: Triton transfers, warm-up, stream waits, sentinels.

The same checks as tests/vllm/test_worker_unit.py (which runs on vLLM's CPU
layout), on a ``flash`` cache on the GPU, where KVWorker's copies go through
the Triton kernels. Skipped cleanly where no GPU or no Triton is present.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
triton = pytest.importorskip("triton") if torch.cuda.is_available() else None

from kvtier.config import KVTierConfig  # noqa: E402
from kvtier.layout import ChunkLayout  # noqa: E402
from kvtier.store import Store  # noqa: E402
from kvtier.transfer import PagedKV  # noqa: E402
from kvtier.vllm.scheduler import LoadSpec, SaveSpec  # noqa: E402
from kvtier.vllm.worker import KVWorker  # noqa: E402

L, H, D, BS, NB, C = 2, 2, 32, 16, 48, 256
SENTINEL = -7.5


@pytest.fixture
def store():
    s = Store(KVTierConfig(chunk_size=C, tiers=("cpu",), cpu_bytes=8 * 2**20),
              ChunkLayout(L, C, H * D, torch.float32))
    yield s
    s.close()


def _caches():
    return {f"model.layers.{i}.self_attn.attn": torch.full((2, NB, BS, H, D), SENTINEL, device="cuda")
            for i in range(L)}


def _kv_of(cache, slot):
    b, o = divmod(slot, BS)
    return cache[0, b, o].reshape(-1), cache[1, b, o].reshape(-1)


def _put(store, n):
    keys, chunks = [], []
    for i in range(n):
        data = torch.randn(2, L, C, H * D)
        key = f"gpu-chunk-{i}".encode().ljust(16, b"\0")
        assert store.put(key, data.view(torch.uint8).reshape(-1))
        keys.append(key)
        chunks.append(data)
    return keys, chunks


def test_triton_backend_and_warm_up_writes_nothing(store):
    from kvtier.transfer import triton_kernels

    caches = _caches()
    w = KVWorker(store, PagedKV.from_vllm(caches, block_size=BS), C)
    assert w.backend is triton_kernels
    w.warm_up()
    torch.cuda.synchronize()
    for c in caches.values():
        assert bool((c == SENTINEL).all())


def test_load_mid_chunk_leaves_shared_slots_untouched(store):
    keys, chunks = _put(store, 2)
    caches = _caches()
    w = KVWorker(store, PagedKV.from_vllm(caches, block_size=BS), C)
    w.warm_up()
    block_ids = list(range(5, 5 + 32))  # tokens 0..511
    start, end = 300, 500  # local prefix (shared blocks) ends at 300, inside chunk 1
    failed, _ = w.load([LoadSpec("r", 100, end, 0, keys, block_ids)])
    assert not failed
    # The forward's stream waits on the copy: a read queued on it now sees the loaded data.
    for layer, cache in enumerate(caches.values()):
        for t in range(0, 32 * BS):
            k, v = _kv_of(cache, block_ids[t // BS] * BS + t % BS)
            if 100 <= t < end:
                ci = t // C
                assert torch.equal(k.cpu(), chunks[ci][0, layer, t % C])
                assert torch.equal(v.cpu(), chunks[ci][1, layer, t % C])
            else:
                assert bool((k == SENTINEL).all()) and bool((v == SENTINEL).all()), f"token {t} written"
    w.finish_step()
    assert not w._in_flight
    # A second load starting mid-chunk 1 onto fresh sentinel blocks.
    caches2 = _caches()
    w2 = KVWorker(store, PagedKV.from_vllm(caches2, block_size=BS), C)
    w2.load([LoadSpec("r2", start, end, 1, keys[1:], block_ids)])
    for layer, cache in enumerate(caches2.values()):
        for t in range(0, 32 * BS):
            k, v = _kv_of(cache, block_ids[t // BS] * BS + t % BS)
            if start <= t < end:
                assert torch.equal(k.cpu(), chunks[1][0, layer, t - C])
            else:
                assert bool((k == SENTINEL).all()) and bool((v == SENTINEL).all()), f"token {t} written"
    w2.finish_step()


def test_save_then_load_roundtrip(store):
    """Save from one GPU cache, load into another (other blocks, reversed): same K/V per token."""
    src_caches = _caches()
    for c in src_caches.values():
        c.copy_(torch.randn_like(c))
    w = KVWorker(store, PagedKV.from_vllm(src_caches, block_size=BS), C)
    src = list(range(10, 42))
    keys = [b"save-0".ljust(16, b"\0"), b"save-1".ljust(16, b"\0")]
    w.save([SaveSpec("r", [0, 1], keys, src)], skip_reqs=set())
    w.save([SaveSpec("bad", [0], [b"x" * 16], src)], skip_reqs={"bad"})
    assert store.contains(keys + [b"x" * 16]) == [True, True, False]
    dst_caches = _caches()
    w2 = KVWorker(store, PagedKV.from_vllm(dst_caches, block_size=BS), C)
    dst = list(range(47, 15, -1))
    failed, _ = w2.load([LoadSpec("q", 0, 511, 0, keys, dst)])
    assert not failed
    w2.finish_step()
    for (n, a), b in zip(src_caches.items(), dst_caches.values()):
        for t in range(512):
            s_slot, d_slot = src[t // BS] * BS + t % BS, dst[t // BS] * BS + t % BS
            got = _kv_of(b, d_slot)
            if t < 511:
                assert all(torch.equal(x, y) for x, y in zip(got, _kv_of(a, s_slot))), (n, t)
            else:  # the last token is not loaded
                assert all(bool((x == SENTINEL).all()) for x in got)
