import threading

import pytest
import torch

from kvtier.memory import ChunkRef, HostPool


def test_alloc_until_full_then_none_and_reuse():
    pool = HostPool(64, 4, pin=False)
    slots = [pool.alloc() for _ in range(4)]
    assert sorted(slots) == [0, 1, 2, 3]
    assert pool.alloc() is None
    pool.release(slots[2])
    assert pool.alloc() == slots[2]


def test_slot_in_use_is_never_reused():
    pool = HostPool(16, 2, pin=False)
    ref = ChunkRef(pool, pool.alloc())
    ref.data.fill_(7)
    reader = ref.share()
    ref.release()  # the owner drops it, a reader still holds it
    other = pool.alloc()
    assert other is not None and other != reader.slot
    assert pool.alloc() is None  # the read slot is not free
    assert torch.all(reader.data == 7)
    reader.release()
    assert pool.alloc() == reader.slot


def test_double_release_and_use_after_release_fail_loudly():
    pool = HostPool(16, 1, pin=False)
    ref = ChunkRef(pool, pool.alloc())
    ref.release()
    with pytest.raises(RuntimeError):
        ref.release()
    with pytest.raises(RuntimeError):
        ref.data
    with pytest.raises(RuntimeError):
        pool.release(0)


def test_views_are_disjoint_and_share_one_buffer():
    pool = HostPool(8, 3, pin=False)
    for s in range(3):
        pool.view(s).fill_(s + 1)
    assert pool.buffer.tolist() == [1] * 8 + [2] * 8 + [3] * 8


def test_concurrent_alloc_release_keeps_counts():
    pool = HostPool(8, 32, pin=False)
    errors = []

    def worker():
        try:
            for _ in range(2000):
                s = pool.alloc()
                if s is not None:
                    pool.retain(s)
                    pool.release(s)
                    pool.release(s)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert pool.free_slots == 32
    assert all(pool.refcount(s) == 0 for s in range(32))


def test_pool_too_small_is_a_clear_error():
    with pytest.raises(ValueError, match="raise cpu_bytes"):
        HostPool.for_bytes(100, 1000)
