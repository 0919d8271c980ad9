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
    # load() waits for the copies: the cache now holds the loaded data.
    for layer, cache in enumerate(caches.values()):
        for t in range(0, 32 * BS):
            k, v = _kv_of(cache, block_ids[t // BS] * BS + t % BS)
            if 100 <= t < end:
                ci = t // C
                assert torch.equal(k.cpu(), chunks[ci][0, layer, t % C])
                assert torch.equal(v.cpu(), chunks[ci][1, layer, t % C])
            else:
                assert bool((k == SENTINEL).all()) and bool((v == SENTINEL).all()), f"token {t} written"
    assert w._loads is None  # load() finishes the step: host chunks released
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
    for (n, a), b in zip(src_caches.items(), dst_caches.values()):
        for t in range(512):
            s_slot, d_slot = src[t // BS] * BS + t % BS, dst[t // BS] * BS + t % BS
            got = _kv_of(b, d_slot)
            if t < 511:
                assert all(torch.equal(x, y) for x, y in zip(got, _kv_of(a, s_slot))), (n, t)
            else:  # the last token is not loaded
                assert all(bool((x == SENTINEL).all()) for x in got)


def test_layer_wise_step_on_the_forward_stream(store):
    """start_load enqueues every layer; load_layer(l) makes the current stream wait for layer l:
    a read queued on it right after sees that layer's loaded KV, layer by layer. Saves taken at
    each layer's hook after writes queued on the stream hold those writes."""
    keys, chunks = _put(store, 2)
    caches = _caches()
    w = KVWorker(store, PagedKV.from_vllm(caches, block_size=BS), C)
    w.warm_up()
    block_ids = list(range(5, 5 + 32))
    failed, _ = w.start_load([LoadSpec("r", 100, 500, 0, keys, block_ids)])
    assert not failed
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        for layer, cache in enumerate(caches.values()):
            w.load_layer(layer)
            got = cache[0, block_ids[300 // BS], 300 % BS].reshape(-1).clone()  # queued on s, after the wait
            s.synchronize()
            assert torch.equal(got.cpu(), chunks[1][0, layer, 300 - C])
    assert w.finish_load() == (set(), set())
    # Saves: each layer written on the stream (behind a sleep), then its hook.
    save_keys = [b"lw-save-0".ljust(16, b"\0")]
    w.start_save([SaveSpec("r", [0], save_keys, block_ids)])
    with torch.cuda.stream(s):
        for layer, cache in enumerate(caches.values()):
            torch.cuda._sleep(20_000_000)
            cache.fill_(float(layer + 1))
            w.save_layer(layer)
    w.finish_save()
    w.drain_saves()  # on a GPU the save thread commits once the copies are done
    ref = store.get(save_keys)[0]
    saved = ref.data[:w.chunk_nbytes].view(torch.float32).view(2, L, C, H * D)
    for layer in range(L):
        assert bool((saved[:, layer] == float(layer + 1)).all())
    ref.release()


def test_saves_commit_after_the_step_and_fence_on_released_requests(store):
    """finish_save does not wait for the copies (queued behind 0.2 s of work on the forward's
    stream); fence_saves waits for them only when a block they read is handed out (or, where
    that is not known, their request is not kept). After the fence the blocks may be reused:
    an overwrite queued on another stream never reaches the chunk."""
    caches = _caches()
    w = KVWorker(store, PagedKV.from_vllm(caches, block_size=BS), C)
    w.warm_up()
    block_ids = list(range(3, 3 + C // BS))
    for layer, cache in enumerate(caches.values()):
        cache.fill_(float(layer + 1))
    keys = [b"fence-save-0".ljust(16, b"\0")]
    w.start_save([SaveSpec("r", [0], keys, block_ids)])
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        torch.cuda._sleep(200_000_000)  # the forward, still running when the step returns
        for layer in range(L):
            w.save_layer(layer)
    w.finish_save()
    assert store.get(keys) == [None], "committed before its copies could have run"
    w.fence_saves(kept={"r", "other"})  # "r" keeps its blocks: no wait
    w.fence_saves(kept=set(), fresh=frozenset({0, 1}))  # only blocks 0 and 1 are handed out
    assert len(w._saving) == 1 and store.get(keys) == [None]
    w.fence_saves(kept={"r"}, fresh=frozenset({block_ids[5]}))  # one of its blocks is handed out
    assert not w._saving
    for cache in caches.values():  # the next owner writes them, on a stream of its own
        cache.fill_(99.0)
    torch.cuda.synchronize()
    ref = store.get(keys)[0]
    saved = ref.data[:w.chunk_nbytes].view(torch.float32).view(2, L, C, H * D)
    for layer in range(L):
        assert bool((saved[:, layer] == float(layer + 1)).all())
    ref.release()
    assert w.stats["saved_chunks"] == 1


def test_gpu_layer_groups_follow_min_run_bytes():
    """Llama-8B geometry on a GPU (512 KiB per layer and K/V of a 256-token chunk): 8 layers per
    copy, so a step issues 4 copies, not 32."""
    from kvtier.vllm.worker import MIN_RUN_BYTES

    paged = PagedKV([torch.empty(2, 4, 16, 8, 128, dtype=torch.bfloat16, device="cuda") for _ in range(32)], "flash")
    w = KVWorker(None, paged, 256)
    assert MIN_RUN_BYTES == 4 << 20
    assert w.groups == [(0, 8), (8, 16), (16, 24), (24, 32)]
    # Saves: one copy of every layer (nothing waits for them in the step), by groups where the
    # step commits them (a prefill instance).
    assert w.save_groups == [(0, 32)]
    assert KVWorker(None, paged, 256, save_in_step=True).save_groups == w.groups


def test_vllm_032_gpu_layout_mid_chunk_load_and_round_trip(store):
    """vLLM 0.32's GPU cache ([NB, H, BS, 2*D] per layer over memory [NB, BS, H, 2*D], LBNHC; K and V
    split in the last dim, read the way flash_attn.py reads it): Triton moves it, a mid-chunk load
    leaves the shared slots' sentinels alone, and saved chunks load back identically."""
    from kvtier.transfer import triton_kernels

    def caches():
        return {f"model.layers.{i}.self_attn.attn":
                torch.full((NB, BS, H, 2 * D), SENTINEL, device="cuda").transpose(1, 2) for i in range(L)}

    def kv(cache, slot):
        k, v = cache.transpose(1, 2).split(D, dim=-1)  # flash_attn.py's view: [NB, BS, H, D] each
        b, o = divmod(slot, BS)
        return k[b, o].reshape(-1), v[b, o].reshape(-1)

    keys, chunks = _put(store, 2)
    cs = caches()
    paged = PagedKV.from_vllm(cs, block_size=BS)
    assert paged.kind == "kv_split" and paged.num_pieces == H
    w = KVWorker(store, paged, C)
    assert w.backend is triton_kernels
    w.warm_up()
    block_ids = list(range(5, 5 + 32))
    failed, _ = w.load([LoadSpec("r", 300, 500, 1, keys[1:], block_ids)])
    assert not failed
    for layer, cache in enumerate(cs.values()):
        for t in range(0, 32 * BS):
            k, v = kv(cache, block_ids[t // BS] * BS + t % BS)
            if 300 <= t < 500:
                assert torch.equal(k.cpu(), chunks[1][0, layer, t - C]) and torch.equal(v.cpu(), chunks[1][1, layer, t - C])
            else:
                assert bool((k == SENTINEL).all()) and bool((v == SENTINEL).all()), f"token {t} written"
    out = [b"kvs-0".ljust(16, b"\0")]
    w.save([SaveSpec("r", [1], out, block_ids)])
    ref = store.get(out)[0]
    saved = ref.data[:w.chunk_nbytes].view(torch.float32).view(2, L, C, H * D)
    assert torch.equal(saved[:, :, 300 - C:500 - C], chunks[1][:, :, 300 - C:500 - C])
    ref.release()


def _reported(w, timeout: float = 30.0):
    """Poll finished_parked (as get_finished does each step) until something is reported."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, failed = w.finished_parked()
        if done:
            return done, failed
        time.sleep(0.001)
    raise AssertionError("a parked load was never reported")


def _check_loaded(caches, chunks, block_ids, start, end, missing=()):
    """Tokens [start, end) hold the chunks' K/V (but for chunks in ``missing``); every other slot its sentinel."""
    for layer, cache in enumerate(caches.values()):
        c = cache.cpu()
        for t in range(0, len(block_ids) * BS):
            k, v = _kv_of(c, block_ids[t // BS] * BS + t % BS)
            if start <= t < end and t // C not in missing:
                assert torch.equal(k, chunks[t // C][0, layer, t % C]), (layer, t)
                assert torch.equal(v, chunks[t // C][1, layer, t % C]), (layer, t)
            elif not start <= t < end:
                assert bool((k == SENTINEL).all()) and bool((v == SENTINEL).all()), f"token {t} written"


def test_parked_inline_load_orders_the_next_forward(store):
    """An inline parked load is reported at once, its copies still in flight (queued here behind
    a 50 ms sleep): before_forward makes the forward's stream wait for them on the device, so a
    read queued there sees the loaded KV. Blocks below the start are never written."""
    keys, chunks = _put(store, 2)
    caches = _caches()
    w = KVWorker(store, PagedKV.from_vllm(caches, block_size=BS), C)
    w.warm_up()
    block_ids = list(range(5, 5 + 32))
    torch.cuda._sleep(100_000_000)  # the copies start after the work queued so far
    w.park_load([LoadSpec("r", 100, 500, 0, keys, block_ids)])
    assert w.finished_parked() == ({"r"}, set())
    fwd = torch.cuda.Stream()
    with torch.cuda.stream(fwd):
        w.before_forward()
        got = next(iter(caches.values()))[0, block_ids[300 // BS], 300 % BS].reshape(-1).clone()
    fwd.synchronize()
    assert torch.equal(got.cpu(), chunks[1][0, 0, 300 - C])
    torch.cuda.synchronize()
    _check_loaded(caches, chunks, block_ids, 100, 500)
    w.finished_parked()
    assert not w._pending and w.stats["loaded_tokens"] == 400


def test_parked_background_load_reported_once_copied(store):
    """A background load (the load thread, its own stream) is reported only once its copies are
    done; a chunk missing meanwhile fails its blocks only, the other chunk lands."""
    keys, chunks = _put(store, 3)
    keys[1] = b"never-stored".ljust(16, b"\0")
    caches = _caches()
    w = KVWorker(store, PagedKV.from_vllm(caches, block_size=BS), C)
    w.warm_up()
    block_ids = list(range(NB - 1, -1, -1))  # every block of the cache, in reverse
    w.park_load([LoadSpec("r", 0, 700, 0, keys, block_ids, background=True)])
    done, failed = _reported(w)
    assert done == {"r"}
    assert failed == {block_ids[b] for b in range(C // BS, 2 * C // BS)}  # chunk 1's blocks only
    _check_loaded(caches, chunks, block_ids, 0, 700, missing={1})
    w.drain_parked()
    assert not w._jobs and not w._landing and not w._pending


def test_parked_background_load_waits_for_earlier_work(store):
    """Background copies start after what the engine had queued when the load was parked (a
    forward still writing those blocks' previous contents must not overwrite the loaded KV)."""
    keys, chunks = _put(store, 1)
    caches = _caches()
    w = KVWorker(store, PagedKV.from_vllm(caches, block_size=BS), C)
    w.warm_up()
    block_ids = list(range(5, 5 + 16))
    torch.cuda._sleep(100_000_000)
    for cache in caches.values():  # queued behind the sleep: runs before the load's copies
        cache[:, block_ids].fill_(SENTINEL)
    w.park_load([LoadSpec("r", 0, 256, 0, keys, block_ids, background=True)])
    assert _reported(w) == ({"r"}, set())
    _check_loaded(caches, chunks, block_ids, 0, 256)
