"""Worker-side loads and saves on a vLLM-layout paged cache, without an engine.

The overlap bug (known in another project): a load that starts in the middle of a
chunk, aligned down to the chunk start and written from there, overwrites blocks
below the request's computed prefix — blocks shared through prefix caching with
running requests. Here those slots hold sentinels that must survive the load.

The cache is vLLM 0.32's CPU layout ([NB, H, BS, 2*D] per layer, memory
[NB, H, 2, BS, D]), read back the way vLLM's CPU attention reads it; the worker
moves data with kvtier.transfer (one scatter/gather per request).
"""

from __future__ import annotations

import threading
from contextlib import contextmanager

import pytest
import torch

from kvtier.config import KVTierConfig
from kvtier.keys import Namespace, chunk_keys
from kvtier.layout import ChunkLayout
from kvtier.store import Store
from kvtier.transfer import LayoutError, PagedKV
from kvtier.vllm.scheduler import LoadSpec, SaveSpec
from kvtier.vllm.worker import KVWorker

L, H, D, BS, NB, C = 2, 2, 32, 32, 40, 256
SENTINEL = -7.5


def _cpu_cache() -> dict[str, torch.Tensor]:
    # vLLM 0.32 CPU backend: [NB, H, BS, 2*D] per layer = per block and head, BS rows of K then BS of V.
    return {f"model.layers.{i}.self_attn.attn": torch.full((NB, H, BS, 2 * D), SENTINEL) for i in range(L)}


def _kv_of(cache: torch.Tensor, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V rows ([H*D]) of one slot, read the way vLLM's CPU attention kernel reads them."""
    v = cache.view(NB, H, 2 * BS, D)
    b, o = divmod(slot, BS)
    return v[b, :, o].reshape(-1), v[b, :, BS + o].reshape(-1)


@pytest.fixture
def store():
    s = Store(KVTierConfig(chunk_size=C, tiers=("cpu",), cpu_bytes=8 * 2**20), ChunkLayout(L, C, H * D, torch.float32))
    yield s
    s.close()


def _setup(store):
    ns = Namespace("unit", "float32", L, H, D)
    tokens = list(range(5, 5 + 600))
    keys = chunk_keys(ns, tokens, C)
    chunks = []
    for k in keys:
        data = torch.randn(2, L, C, H * D)
        assert store.put(k, data.view(torch.uint8).reshape(-1))
        chunks.append(data)
    return keys, chunks


def _mid_chunk_load(store, load=KVWorker.load):
    """Load tokens [320, 500) of chunk 1 (the local prefix, shared blocks, ends at 320).

    Returns (tokens outside [320, 500) whose slots were written, tokens inside loaded wrong).
    """
    keys, chunks = _setup(store)
    caches = _cpu_cache()
    paged = PagedKV.from_vllm(caches, block_size=BS)
    assert paged.kind == "cpu" and paged.num_pieces == H
    w = KVWorker(store, paged, C)
    block_ids = list(range(3, 3 + 19))  # tokens 0..607
    start, end = 320, 500
    failed, _ = load(w, [LoadSpec("r", start, end, 1, [keys[1]], block_ids)])
    assert not failed
    written, wrong = set(), set()
    for layer, cache in enumerate(caches.values()):
        for t in range(0, 19 * BS):
            slot = block_ids[t // BS] * BS + t % BS
            k, v = _kv_of(cache, slot)
            if start <= t < end:
                if not (torch.equal(k, chunks[1][0, layer, t - 256]) and torch.equal(v, chunks[1][1, layer, t - 256])):
                    wrong.add(t)
            elif not ((k == SENTINEL).all() and (v == SENTINEL).all()):
                written.add(t)
        # Blocks nobody loaded into are untouched too.
        others = [b for b in range(NB) if b not in block_ids[10:16]]
        if not (cache[others] == SENTINEL).all():
            written.add(-1)
    return written, wrong


def test_load_mid_chunk_leaves_shared_slots_untouched(store):
    written, wrong = _mid_chunk_load(store)
    assert not wrong, f"tokens loaded wrong: {sorted(wrong)[:8]}"
    assert not written, f"slots of tokens outside the load were written: {sorted(written)[:8]}"


def test_aligned_down_load_is_caught(store):
    """The known bug (a load's start aligned down to its chunk boundary) fails the check above."""

    def aligned_down(worker, specs):
        for s in specs:
            s.start = s.start // C * C
        return KVWorker.load(worker, specs)

    written, _ = _mid_chunk_load(store, aligned_down)
    assert written - {-1} == set(range(256, 320)), sorted(written)[:8]  # -1: blocks outside the load written


def test_failed_chunk_reports_its_blocks_and_writes_nothing(store):
    keys, _ = _setup(store)
    store.cpu.delete([keys[1]])  # evicted between lookup and load
    caches = _cpu_cache()
    w = KVWorker(store, PagedKV.from_vllm(caches, block_size=BS), C)
    block_ids = list(range(3, 3 + 19))
    failed, reqs = w.load([LoadSpec("r", 128, 500, 0, keys[:2], block_ids)])
    assert reqs == {"r"}
    assert failed == set(block_ids[256 // BS:(500 - 1) // BS + 1])
    assert not (set(block_ids[:256 // BS]) & failed)
    # Chunk 0 loaded (tokens 128..255), chunk 1 wrote nothing.
    for c in caches.values():
        assert (c[block_ids[8:16]] == SENTINEL).all()
        assert not (c[block_ids[4:8]] == SENTINEL).any()


def test_save_then_load_roundtrip_and_skip_on_failure(store):
    caches = _cpu_cache()
    for c in caches.values():
        c.copy_(torch.randn_like(c))
    paged = PagedKV.from_vllm(caches, block_size=BS)
    w = KVWorker(store, paged, C)
    ns = Namespace("unit2", "float32", L, H, D)
    keys = chunk_keys(ns, list(range(600)), C)
    src = list(range(20, 39)) + [0]
    w.save([SaveSpec("r", [0, 1], keys[:2], src)], skip_reqs=set())
    w.save([SaveSpec("bad", [0], [b"x" * 16], src)], skip_reqs={"bad"})
    assert store.contains(keys[:2] + [b"x" * 16]) == [True, True, False]
    before = {n: c.clone() for n, c in caches.items()}
    dst = list(range(1, 20))
    failed, _ = w.load([LoadSpec("q", 0, 511, 0, keys[:2], dst)])
    assert not failed
    for n, c in caches.items():
        for t in range(511):
            s_slot, d_slot = src[t // BS] * BS + t % BS, dst[t // BS] * BS + t % BS
            assert all(torch.equal(a, b) for a, b in zip(_kv_of(c, d_slot), _kv_of(before[n], s_slot)))


def test_layouts_detected_and_unsupported_refused():
    # flash [2, NB, BS, H, D] and blocks_first [NB, 2, BS, H, D] (CUDA layouts; built on CPU here)
    t = torch.zeros(2, NB, BS, H, D)
    assert PagedKV.from_vllm({"l.0": t}, kind="flash").kind == "flash"
    with pytest.raises(LayoutError, match="ambiguous"):  # [2, 2, ...]: flash or blocks_first
        PagedKV.from_vllm({"l.0": torch.zeros(2, 2, BS, H, D)})
    with pytest.raises(LayoutError, match="no known layout"):
        PagedKV.from_vllm({"l.0": torch.zeros(NB, 3, BS, 2 * D + 1)})
    with pytest.raises(LayoutError, match="block_size"):
        PagedKV.from_vllm(_cpu_cache(), block_size=16)
    # vLLM's GPU backends use the same 4-D shape with K and V split in the last dimension.
    gpu = PagedKV.from_vllm({"l.0": torch.zeros(NB, H, BS, 2 * D, device="meta")})
    assert gpu.kind == "kv_split" and gpu.num_pieces == H and gpu.kv_stride == D


def test_load_is_one_scatter_per_layer_over_all_chunks(store, monkeypatch):
    """A step's chunks move with one scatter per layer (layer-wise); a missing chunk is left out."""
    import kvtier.vllm.worker as worker_mod

    keys, chunks = _setup(store)
    calls = []
    real = worker_mod.scatter

    def spy(paged, mapping, bufs, skip=0, **kw):
        calls.append((mapping.clone(), len(bufs), skip, kw.get("layers")))
        return real(paged, mapping, bufs, skip, **kw)

    monkeypatch.setattr(worker_mod, "scatter", spy)
    block_ids = list(range(2, 2 + 16))  # tokens 0..511
    start, end = 100, 500
    for missing in (None, 0):
        if missing is not None:
            store.cpu.delete([keys[missing]])
        calls.clear()
        caches = _cpu_cache()
        w = KVWorker(store, PagedKV.from_vllm(caches, block_size=BS), C)
        failed, reqs = w.load([LoadSpec("r", start, end, 0, keys[:2], block_ids)])
        assert [c[3] for c in calls] == [(layer, layer + 1) for layer in range(L)]
        assert all(torch.equal(c[0], calls[0][0]) for c in calls)
        mapping, n, skip, _ = calls[0]
        assert skip == 0  # tokens below start are -1 in the mapping
        if missing is None:
            assert not failed and not reqs
            assert n == 2 and mapping.numel() == 2 * C
            assert (mapping[:start] == -1).all() and (mapping[end:] == -1).all() and (mapping[start:end] >= 0).all()
            loaded = range(start, end)
        else:  # chunk 0 missing: its blocks fail, chunk 1 alone is scattered, from its start
            assert reqs == {"r"} and failed == set(block_ids[start // BS:C // BS])
            assert n == 1 and mapping.numel() == C
            assert (mapping[:end - C] >= 0).all() and (mapping[end - C:] == -1).all()
            loaded = range(C, end)
        for layer, cache in enumerate(caches.values()):
            for t in range(16 * BS):
                k, v = _kv_of(cache, block_ids[t // BS] * BS + t % BS)
                if t in loaded:
                    ci = t // C
                    assert torch.equal(k, chunks[ci][0, layer, t % C]) and torch.equal(v, chunks[ci][1, layer, t % C])
                else:
                    assert (k == SENTINEL).all() and (v == SENTINEL).all(), f"slot of token {t} was written"
        assert w.stats["loaded_tokens"] == len(loaded)
        assert w._loads is None  # the step is finished: host chunks released


def test_full_pool_skips_save(store):
    caches = _cpu_cache()
    w = KVWorker(store, PagedKV.from_vllm(caches, block_size=BS), C)
    held = []
    while (ref := store.allocate()) is not None:
        held.append(ref)
    ns = Namespace("unit3", "float32", L, H, D)
    keys = chunk_keys(ns, list(range(600)), C)
    w.save([SaveSpec("r", [0, 1], keys[:2], list(range(20)))])
    assert w.stats["skipped_saves"] == 2 and w.stats["saved_chunks"] == 0
    for ref in held:
        ref.release()
    assert store.contains(keys[:2]) == [False, False]


def test_saves_are_planned_at_the_first_layer_hook_not_at_the_step_start(store):
    """The step's start is where the GPU waits for the forward's first launch (an H100 spent 0.5 ms
    planning an 8K-token save there): ``start_save`` only takes the specs, the first layer's hook
    plans them (host slots taken), and what is saved is the same."""
    w = KVWorker(store, PagedKV.from_vllm(_cpu_cache(), block_size=BS), C)
    keys = chunk_keys(Namespace("unit-lazy", "float32", L, H, D), list(range(800)), C)
    free = store.pool.free_slots
    w.start_save([SaveSpec("r", [0, 1], keys[:2], list(range(20)))])
    assert store.pool.free_slots == free  # nothing planned yet
    w.save_layer(0)
    assert store.pool.free_slots == free - 2
    w.save_layer(1)
    w.finish_save()
    w.drain_saves()
    assert store.contains(keys[:2]) == [True, True] and w.stats["saved_chunks"] == 2
    # Saves no hook ran for are planned and copied at finish_save, as before.
    w.start_save([SaveSpec("r", [2], keys[2:3], list(range(24)))])
    w.finish_save()
    w.drain_saves()
    assert store.contains(keys[2:3]) == [True]


# ---------------------------------------------------------------------- layer by layer
def _loaded(cache, block_ids, lo, hi, chunk, base):
    """Tokens [lo, hi) of ``cache`` hold chunk ``chunk`` (token t at row t - base)."""
    return all(torch.equal(_kv_of(cache, block_ids[t // BS] * BS + t % BS)[0], chunk[0, 0, t - base])
               for t in range(lo, hi))


def test_layer_wise_load_copies_each_layer_at_its_hook(store):
    """CPU: start_load plans; load_layer(l) puts layer l in place (and only it); finish releases."""
    keys, chunks = _setup(store)
    caches = list(_cpu_cache().values())
    w = KVWorker(store, PagedKV.from_vllm({f"l.{i}": c for i, c in enumerate(caches)}, block_size=BS), C)
    block_ids = list(range(3, 3 + 19))
    free = store.pool.free_slots
    failed, _ = w.start_load([LoadSpec("r", 256, 500, 1, [keys[1]], block_ids)])
    assert not failed
    assert all((c == SENTINEL).all() for c in caches)  # nothing moves before the hooks
    w.load_layer(0)
    assert _loaded(caches[0], block_ids, 256, 500, chunks[1], 256)
    assert (caches[1] == SENTINEL).all()  # layer 1 waits for its own hook
    w.load_layer(1)
    w.load_layer(1)  # a second call for a layer (names sharing a tensor) does nothing more
    v = caches[1].view(NB, H, 2 * BS, D)
    assert torch.equal(v[block_ids[8], :, 0].reshape(-1), chunks[1][0, 1, 0])
    assert w.finish_load() == (set(), set())
    assert w._loads is None and store.pool.free_slots == free  # the chunk's reference is released


def test_layer_not_waited_for_fails_the_steps_loads(store):
    """Attention of layer 1 ran without load_layer(1): every load of the step is reported failed."""
    keys, _ = _setup(store)
    w = KVWorker(store, PagedKV.from_vllm(_cpu_cache(), block_size=BS), C)
    ids_a, ids_b = list(range(0, 19)), list(range(19, 38))
    failed, _ = w.start_load([LoadSpec("a", 0, 300, 0, keys[:2], ids_a),
                              LoadSpec("b", 256, 400, 1, [keys[1]], ids_b)])
    assert not failed
    w.load_layer(0)
    blocks, reqs = w.finish_load()
    assert reqs == {"a", "b"}
    assert blocks == set(ids_a[:(300 - 1) // BS + 1]) | set(ids_b[256 // BS:(400 - 1) // BS + 1])
    assert w.stats["unready_layer_loads"] == 1 and w.stats["loaded_tokens"] == 0


def test_layer_copy_that_raises_fails_the_steps_loads(store, monkeypatch):
    import kvtier.vllm.worker as worker_mod

    keys, _ = _setup(store)
    real = worker_mod.scatter

    def flaky(paged, mapping, bufs, skip=0, **kw):
        if kw.get("layers") == (1, 2):
            raise RuntimeError("injected copy failure")
        return real(paged, mapping, bufs, skip, **kw)

    monkeypatch.setattr(worker_mod, "scatter", flaky)
    w = KVWorker(store, PagedKV.from_vllm(_cpu_cache(), block_size=BS), C)
    ids = list(range(0, 19))
    w.start_load([LoadSpec("a", 0, 300, 0, keys[:2], ids)])
    w.load_layer(0)
    w.load_layer(1)  # raises inside: logged, never out of the hook
    blocks, reqs = w.finish_load()
    assert reqs == {"a"} and blocks == set(ids[:(300 - 1) // BS + 1])


def test_layer_wise_save_copies_each_layer_at_its_hook(store):
    """save_layer(l) copies layer l when called: later writes to it are not in the saved chunk;
    layers whose hook never ran are copied at finish_save."""
    caches = list(_cpu_cache().values())
    for c in caches:
        c.copy_(torch.randn_like(c))
    w = KVWorker(store, PagedKV.from_vllm({f"l.{i}": c for i, c in enumerate(caches)}, block_size=BS), C)
    ns = Namespace("unit-lw", "float32", L, H, D)
    keys = chunk_keys(ns, list(range(300)), C)
    src = list(range(20, 28))
    w.start_save([SaveSpec("r", [0], keys[:1], src)])
    at_hook = caches[0].clone()
    w.save_layer(0)
    caches[0].fill_(1.0)  # the engine reuses the blocks of layer 0 after its save
    caches[1].fill_(2.0)  # layer 1 is written after its (missing) hook: finish_save copies it then
    w.finish_save()
    assert store.contains(keys[:1]) == [True]
    ref = store.get(keys[:1])[0]
    saved = ref.data[:w.chunk_nbytes].view(torch.float32).view(2, L, C, H * D).clone()
    ref.release()
    for t in (0, 100, 255):
        slot = src[t // BS] * BS + t % BS
        k0, v0 = _kv_of(at_hook, slot)
        assert torch.equal(saved[0, 0, t], k0) and torch.equal(saved[1, 0, t], v0)
        assert (saved[:, 1, t] == 2.0).all()


def test_failed_request_commits_nothing_and_returns_its_slots(store):
    caches = _cpu_cache()
    w = KVWorker(store, PagedKV.from_vllm(caches, block_size=BS), C)
    ns = Namespace("unit-skip", "float32", L, H, D)
    keys = chunk_keys(ns, list(range(600)), C)
    free = store.pool.free_slots
    w.start_save([SaveSpec("ok", [0], keys[:1], list(range(8))), SaveSpec("bad", [1], keys[1:2], list(range(8, 24)))])
    for layer in range(L):
        w.save_layer(layer)
    assert store.pool.free_slots == free - 2
    w.finish_save(skip_reqs={"bad"})
    assert store.contains(keys[:2]) == [True, False]
    assert w.stats["saved_chunks"] == 1 and w.stats["skipped_saves"] == 1
    assert store.pool.free_slots == free - 1  # the skipped chunk's slot is back; the committed one is held


@contextmanager
def _four_layers(**kw):
    """A cpu-tier store and a worker over 4 layers of random KV, copying layers 2 at a time."""
    st = Store(KVTierConfig(chunk_size=C, tiers=("cpu",), cpu_bytes=8 * 2**20), ChunkLayout(4, C, H * D, torch.float32))
    try:
        caches = [torch.randn(NB, H, BS, 2 * D) for _ in range(4)]
        paged = PagedKV.from_vllm({f"l.{i}": c for i, c in enumerate(caches)}, block_size=BS)
        yield st, caches, KVWorker(st, paged, C, layers_per_copy=2, **kw)
    finally:
        st.close()


def test_layer_groups_copy_once_all_their_layers_are_due(monkeypatch):
    """layers_per_copy=2 on 4 layers: a load copies a group at its first layer's hook; a save
    copies a group only once every layer of it has been written (hooks in any order), and the
    groups whose hooks never ran at finish_save."""
    import kvtier.vllm.worker as worker_mod

    calls = []
    for name in ("gather", "scatter"):
        real = getattr(worker_mod, name)

        def spy(paged, mapping, bufs, skip=0, real=real, name=name, **kw):
            calls.append((name, kw.get("layers")))
            return real(paged, mapping, bufs, skip, **kw)

        monkeypatch.setattr(worker_mod, name, spy)
    n_layers = 4
    with _four_layers() as (st, caches, w):
        assert w.groups == [(0, 2), (2, 4)]
        key = b"group-load".ljust(16, b"\0")
        assert st.put(key, torch.randn(2, n_layers, C, H * D).view(torch.uint8).reshape(-1))
        w.start_load([LoadSpec("r", 0, C, 0, [key], list(range(8)))])
        for layer in range(n_layers):
            w.load_layer(layer)
        assert calls == [("scatter", (0, 2)), ("scatter", (2, 4))]
        assert w.finish_load() == (set(), set())
        calls.clear()
        out = b"group-save".ljust(16, b"\0")
        w.start_save([SaveSpec("r", [0], [out], list(range(8, 16)))])
        w.save_layer(1)
        assert calls == []  # layer 0 of the group is not written yet
        w.save_layer(0)
        assert calls == [("gather", (0, 2))]
        for c in caches:
            c.fill_(3.0)  # after the group's copy; group (2, 4) has no hook: copied at finish, with these
        w.finish_save()
        assert calls == [("gather", (0, 2)), ("gather", (2, 4))]
        ref = st.get([out])[0]
        saved = ref.data[:w.chunk_nbytes].view(torch.float32).view(2, n_layers, C, H * D)
        assert not (saved[:, :2] == 3.0).all() and (saved[:, 2:] == 3.0).all()
        ref.release()


def test_a_save_group_of_every_layer_is_one_copy_after_the_last_hook(monkeypatch):
    """save_layers_per_copy=4 on 4 layers (a GPU's default when nothing waits for the saves in
    the step): loads still copy by groups of 2, a save is one gather of every layer once the
    last of them is written, and it holds what the layers held then."""
    import kvtier.vllm.worker as worker_mod

    calls = []
    real = worker_mod.gather

    def spy(paged, mapping, bufs, skip=0, **kw):
        calls.append(kw.get("layers"))
        return real(paged, mapping, bufs, skip, **kw)

    monkeypatch.setattr(worker_mod, "gather", spy)
    n_layers = 4
    with _four_layers(save_layers_per_copy=4) as (st, caches, w):
        assert w.groups == [(0, 2), (2, 4)] and w.save_groups == [(0, 4)]
        for i, c in enumerate(caches):
            c.fill_(float(i + 1))
        out = b"whole-save".ljust(16, b"\0")
        w.start_save([SaveSpec("r", [0], [out], list(range(8, 16)))])
        for layer in (3, 0, 1):
            w.save_layer(layer)
        assert calls == []  # layer 2 is not written yet
        w.save_layer(2)
        assert calls == [(0, 4)]
        for c in caches:
            c.fill_(9.0)  # after the copy: not in the chunk
        w.finish_save()
        assert calls == [(0, 4)]
        ref = st.get([out])[0]
        saved = ref.data[:w.chunk_nbytes].view(torch.float32).view(2, n_layers, C, H * D)
        for layer in range(n_layers):
            assert bool((saved[:, layer] == float(layer + 1)).all())
        ref.release()


def test_saves_copy_like_loads_unless_told_otherwise():
    """On CPU (copies are synchronous, one layer at a time) saves follow ``layers_per_copy``;
    ``save_in_step`` changes nothing there (its effect is on a GPU: tests/gpu)."""
    paged = PagedKV.from_vllm(_cpu_cache(), block_size=BS)
    assert KVWorker(None, paged, C).save_groups == [(0, 1), (1, 2)]
    assert KVWorker(None, paged, C, save_in_step=True).save_groups == [(0, 1), (1, 2)]
    assert KVWorker(None, paged, C, layers_per_copy=2).save_groups == [(0, 2)]


def test_cpu_copies_one_layer_at_a_time():
    paged = PagedKV.from_vllm(_cpu_cache(), block_size=BS)
    assert KVWorker(None, paged, C).groups == [(0, 1), (1, 2)]


def test_block_ids_past_the_cache_fail_the_load_and_skip_the_save(store):
    """A planning bug (a block id past the cache) is a recompute and a skipped save, never a crash."""
    keys, _ = _setup(store)
    caches = _cpu_cache()
    w = KVWorker(store, PagedKV.from_vllm(caches, block_size=BS), C)
    free = store.pool.free_slots
    bad = list(range(NB - 4, NB + 4))  # tokens 0..255: the last 4 blocks do not exist
    failed, reqs = w.start_load([LoadSpec("r", 0, 255, 0, keys[:1], bad)])
    assert reqs == {"r"} and failed == set(bad)
    assert w._loads is None and store.pool.free_slots == free
    assert all((c == SENTINEL).all() for c in caches.values())
    w.start_save([SaveSpec("s", [0], [b"never".ljust(16, b"\0")], bad)])
    w.finish_save()
    assert w._saves is None and w.stats["skipped_saves"] == 1 and store.pool.free_slots == free


def test_sleep_mode_unregister_waits_for_a_load_copying(store, monkeypatch):
    """vLLM 0.33's sleep mode calls ``unregister_kv_caches`` before it unmaps the KV cache (it
    synchronizes the device first, but kvtier's load thread may be copying a parked load into the
    cache right then). The hook returns only once that copy is done."""
    from kvtier.vllm.connector import KVTierConnector

    keys, chunks = _setup(store)
    caches = _cpu_cache()
    w = KVWorker(store, PagedKV.from_vllm(caches, block_size=BS), C)
    copying, gate = threading.Event(), threading.Event()

    def slow_copy(ld, group):
        copying.set()
        gate.wait(10)
        KVWorker._copy_in(w, ld, group)

    monkeypatch.setattr(w, "_copy_in", slow_copy)
    block_ids = list(range(3, 3 + 19))
    w.park_load([LoadSpec("r", 0, 500, 0, keys[:2], block_ids, background=True)])
    assert copying.wait(10)
    connector = KVTierConnector.__new__(KVTierConnector)  # only its worker half: the hook under test
    connector.worker = w
    hook = threading.Thread(target=connector.unregister_kv_caches)
    hook.start()
    hook.join(0.2)
    waited = hook.is_alive()
    gate.set()
    hook.join(10)
    assert waited, "unregister_kv_caches returned while a parked load was copying into the cache"
    cache = next(iter(caches.values()))
    for t in (0, 255, 256, 499):
        k, _ = _kv_of(cache, block_ids[t // BS] * BS + t % BS)
        assert torch.equal(k, chunks[t // C][0, 0, t % C])
    done, failed = w.finished_parked()
    assert done == {"r"} and not failed


def test_sleep_mode_fetch_stuck_past_the_wait_copies_nothing(store, monkeypatch):
    """A parked load whose fetch outlasts the hook's wait is reported failed when it ends and
    writes nothing into the (unmapped) cache; after ``restore_kv_caches`` loads copy again."""
    from kvtier.vllm import connector as conn

    keys, _ = _setup(store)
    caches = _cpu_cache()
    w = KVWorker(store, PagedKV.from_vllm(caches, block_size=BS), C)
    gate = threading.Event()
    get = store.get
    monkeypatch.setattr(store, "get", lambda ks: (gate.wait(10), get(ks))[1])
    monkeypatch.setattr(conn, "SLEEP_DRAIN_TIMEOUT_S", 0.2)
    block_ids = list(range(3, 3 + 19))
    w.park_load([LoadSpec("r", 0, 500, 0, keys[:2], block_ids, background=True)])
    connector = conn.KVTierConnector.__new__(conn.KVTierConnector)
    connector.worker = w
    connector.unregister_kv_caches()  # returns after 0.2 s with the fetch still stuck
    gate.set()
    w.drain_parked()
    done, failed = w.finished_parked()
    assert done == {"r"} and failed == set(block_ids[:(500 - 1) // BS + 1])
    assert all((c == SENTINEL).all() for c in caches.values())
    assert w.stats["failed_chunks"] == 2
    connector.restore_kv_caches()
    w.park_load([LoadSpec("q", 0, 500, 0, keys[:2], block_ids, background=True)])
    w.drain_parked()
    done, failed = w.finished_parked()
    assert done == {"q"} and not failed
    assert not (next(iter(caches.values()))[block_ids[0]] == SENTINEL).all()


@pytest.mark.parametrize("background", [False, True])
def test_parked_load_of_a_partly_covered_chunk_loads_its_covered_part(store, background):
    """Issue 28.4: vLLM allocates a parked load's blocks only up to the load's end. When that end is
    inside a chunk (the rule when a whole prompt is cached: vLLM keeps its last block to compute),
    the last chunk is only partly covered by the block table. Its covered part is loaded, not
    reported failed (and a chunk that truly lacks slots counts as a failed chunk)."""
    keys, chunks = _setup(store)
    caches = _cpu_cache()
    w = KVWorker(store, PagedKV.from_vllm(caches, block_size=BS), C)
    end = 448  # 14 blocks: chunk 1 is covered up to token 448 of its 512
    block_ids = list(range(3, 3 + end // BS))
    w.park_load([LoadSpec("r", 0, end, 0, keys[:2], block_ids, background=background)])
    w.drain_parked(10)
    done, failed = w.finished_parked()
    assert done == {"r"} and not failed, f"blocks reported failed: {sorted(failed)}"
    assert w.stats["loaded_tokens"] == end and w.stats["failed_chunks"] == 0
    cache = next(iter(caches.values()))
    for t in (0, 255, 256, 447):
        k, v = _kv_of(cache, block_ids[t // BS] * BS + t % BS)
        assert torch.equal(k, chunks[t // C][0, 0, t % C]) and torch.equal(v, chunks[t // C][1, 0, t % C])
    # A table shorter than the load itself (a planning bug): those tokens fail, counted as a chunk.
    w.park_load([LoadSpec("q", 256, end, 1, keys[1:2], block_ids[:10])])
    done, failed = w.finished_parked()
    assert done == {"q"} and failed and w.stats["failed_chunks"] == 1


def test_background_loads_in_batches_load_and_fail_what_a_whole_load_does(tmp_path, monkeypatch):
    """The load thread fetches chunks from the disk tier and copies them in batches (on a GPU one
    batch's copy overlaps the next one's read). Over random loads (start mid-chunk, end inside the
    last chunk, chunks missing in the middle) batches of 1 or 2 chunks write the same slots, report
    the same failed blocks and count the same tokens as one batch of everything."""
    import random

    import kvtier.vllm.worker as worker_mod

    config = KVTierConfig(chunk_size=C, tiers=("disk",), disk_path=str(tmp_path), writer="threads")
    with Store(config, ChunkLayout(L, C, H * D, torch.float32), pin=False) as store:
        ns = Namespace("batches", "float32", L, H, D)
        keys = chunk_keys(ns, list(range(9, 9 + 4 * C)), C)
        for k in keys:
            assert store.put(k, torch.randn(2, L, C, H * D).view(torch.uint8).reshape(-1))
        assert store.flush(10) and store.cpu is None
        gets = []
        get = store.get
        monkeypatch.setattr(store, "get", lambda ks: (gets.append(len(ks)), get(ks))[1])
        rnd = random.Random(7)
        for trial in range(40):
            start = rnd.randrange(0, 4 * C - 1)
            end = rnd.randrange(start + 1, 4 * C + 1)
            first = start // C
            want = keys[first:-(-end // C)]
            missing = {i for i in range(len(want)) if rnd.random() < 0.25}
            ks = [b"gone-%d".ljust(16, b"\0") % i if i in missing else k for i, k in enumerate(want)]
            table = rnd.sample(range(NB), -(-end // BS))
            outcomes = []
            for per_batch in (None, 1, 2):
                caches = _cpu_cache()
                w = KVWorker(store, PagedKV.from_vllm(caches, block_size=BS), C)
                monkeypatch.setattr(worker_mod, "PARKED_BATCH_BYTES", (per_batch or 64) * w.chunk_nbytes)
                gets.clear()
                w.park_load([LoadSpec("r", start, end, first, ks, table)])  # not in memory: the load thread's
                w.drain_parked(10)
                done, failed = w.finished_parked()
                assert done == {"r"}
                assert len(gets) == -(-len(ks) // (per_batch or 64)), (per_batch, gets)
                outcomes.append((failed, w.stats["loaded_tokens"], w.stats["failed_chunks"],
                                 [c.clone() for c in caches.values()]))
            whole = outcomes[0]
            assert whole[1] > 0 or missing, (trial, whole)
            for got in outcomes[1:]:
                assert got[:3] == whole[:3], (trial, start, end, missing)
                assert all(torch.equal(a, b) for a, b in zip(got[3], whole[3])), (trial, start, end, missing)


def test_chunk_slots_match_the_block_table_over_random_tables(store):
    """Every token's slot is its block's id * block size + its offset, -1 where the table ends."""
    import random

    w = KVWorker(store, PagedKV.from_vllm(_cpu_cache(), block_size=BS), C)
    rnd = random.Random(3)
    per = C // BS
    for _ in range(200):
        n_blocks = rnd.randrange(0, 40)
        table = rnd.sample(range(NB * 4), n_blocks)
        first, count = rnd.randrange(0, 5), rnd.randrange(1, 5)
        slots, covered_end = w._chunk_slots(table, first, count)
        assert slots.shape == (count, C)
        for t in range(first * C, (first + count) * C):
            want = table[t // BS] * BS + t % BS if t // BS < n_blocks else -1
            assert int(slots.view(-1)[t - first * C]) == want
        assert covered_end == max(first * C, min((first + count) * C, n_blocks * BS))
        assert per * BS == C


def test_load_plans_map_exactly_the_loaded_tokens_over_random_specs(store):
    """Issue 28.2: the vectorized plan maps every token of [start, end) of each chunk it loads to its
    block's slot and every other position to -1 (skip-prefix, partial chunks, missing chunks), and
    reports as failed exactly the blocks of the chunks it could not load."""
    import random

    keys, _ = _setup(store)  # chunks 0-1 of tokens 5..604 in the cpu tier
    w = KVWorker(store, PagedKV.from_vllm(_cpu_cache(), block_size=BS), C)
    rnd = random.Random(11)
    for _ in range(150):
        table = rnd.sample(range(NB), 19)
        start = rnd.randrange(0, 2 * C)
        end = rnd.randrange(start + 1, 2 * C + 1)
        first = start // C
        count = -(-end // C) - first
        lost = {i for i in range(first, first + count) if rnd.random() < 0.3}
        spec_keys = [b"missing-%d" % i if i in lost else keys[i] for i in range(first, first + count)]
        failed, reqs, ld = w._plan_loads_now([LoadSpec("r", start, end, first, spec_keys, table)])
        want, want_failed = [], set()
        for i in range(first, first + count):
            lo, hi = max(start, i * C), min(end, i * C + C)
            if i in lost:
                want_failed |= {table[t // BS] for t in range(lo, hi)}
                continue
            want += [table[t // BS] * BS + t % BS if lo <= t < hi else -1 for t in range(i * C, i * C + C)]
        assert failed == want_failed and (reqs == {"r"}) == bool(lost)
        if ld is None:
            assert not want
            continue
        assert ld.mapping.tolist() == want
        loaded = {table[t // BS] for i in range(first, first + count) if i not in lost
                  for t in range(max(start, i * C), min(end, i * C + C))}
        assert set(ld.blocks) == loaded and ld.tokens == sum(
            min(end, i * C + C) - max(start, i * C) for i in range(first, first + count) if i not in lost)
        for ref in ld.refs:
            ref.release()


def test_save_plans_map_exactly_the_saved_chunks_over_random_specs(store):
    """Issue 28.2: a step's save plan (several requests, chunk indices with gaps, tables too short
    for some chunks) maps each saved chunk's tokens to its block's slots, in plan order, and its
    blocks answer ``isdisjoint`` as the set of every block the copies read would."""
    import random

    w = KVWorker(store, PagedKV.from_vllm(_cpu_cache(), block_size=BS), C)
    rnd = random.Random(7)
    per = C // BS
    for n in range(150):
        specs = []
        for r in range(rnd.randrange(1, 4)):
            table = rnd.sample(range(NB), rnd.randrange(per, 5 * per))
            chunks = sorted(rnd.sample(range(6), rnd.randrange(1, 5)))
            specs.append(SaveSpec(f"r{r}", chunks, [b"k%d-%d-%d" % (n, r, ci) for ci in chunks], table))
        w._plan_saves(specs)
        want_slots, want_blocks = [], set()
        want_items = [(s.req_id, ci) for s in specs for ci in s.chunk_indices if (ci + 1) * per <= len(s.block_ids)]
        for s in specs:
            for ci in s.chunk_indices:
                if (ci + 1) * per <= len(s.block_ids):
                    ids = s.block_ids[ci * per:(ci + 1) * per]
                    want_blocks |= set(ids)
                    want_slots += [b * BS + o for b in ids for o in range(BS)]
        sv = w._saves
        if not want_items:
            assert sv is None
            continue
        assert [(s.req_id, ci) for s, ci, *_ in sv.items] == want_items
        assert sv.mapping.tolist() == want_slots and set(sv.blocks) == want_blocks
        for _ in range(5):
            probe = set(rnd.sample(range(NB), 3))
            assert sv.blocks.isdisjoint(probe) == want_blocks.isdisjoint(probe)
        for *_, ref in sv.items:
            ref.release()
        w._saves = None


def test_one_step_loads_several_requests_fast_and_slow_paths(store):
    """Two requests in one step's load plan: one whose chunks are all found (planned whole), one
    with a chunk missing (planned chunk by chunk); the mapping holds both, in order."""
    keys, _ = _setup(store)
    w = KVWorker(store, PagedKV.from_vllm(_cpu_cache(), block_size=BS), C)
    a, b = list(range(0, 19)), list(range(20, 39))
    specs = [LoadSpec("a", 100, 2 * C, 0, keys[:2], a), LoadSpec("b", 0, 2 * C, 0, [keys[0], b"gone"], b)]
    failed, reqs, ld = w._plan_loads_now(specs)
    assert reqs == {"b"}
    assert failed == set(b[C // BS:2 * C // BS])
    want = [-1 if t < 100 else a[t // BS] * BS + t % BS for t in range(2 * C)] + [b[t // BS] * BS + t % BS for t in range(C)]
    assert ld.mapping.tolist() == want and ld.tokens == (2 * C - 100) + C
    assert set(ld.blocks) == set(a[100 // BS:2 * C // BS]) | set(b[:C // BS])
    for ref in ld.refs:
        ref.release()
