"""`kvtier bench tiers`: each tier against the raw operation it is built on, side by side.

Every figure is a ratio to a baseline measured in the same run on the same bytes,
alternating baseline and kvtier rounds so machine noise hits both alike:
- cpu:   store.put + store.get (copy out, as a load does) vs two plain memory copies
- disk:  DiskTier put / get_into vs raw sequential file write / read (open, write, close)
- redis: RedisTier put / get_into vs raw redis-py pipelined SET / GET of the same payloads
- keys:  chunk keys + store lookup of a 32K-token prompt vs the time to move its KV at 50 GB/s
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from kvtier.config import KVTierConfig
from kvtier.hostcopy import copy_bytes
from kvtier.keys import Namespace, chunk_keys
from kvtier.layout import ChunkLayout
from kvtier.store import Store
from kvtier.tiers.base import Tier

LLAMA8B = dict(num_layers=32, width=8 * 128, dtype=torch.bfloat16)
SMALL = dict(num_layers=4, width=8 * 128, dtype=torch.bfloat16)


def _gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9 if seconds > 0 else float("inf")


def _timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _side_by_side(baseline: Callable[[], Any], ours: Callable[[], Any], rounds: int, tick: Callable[[], None]
                  ) -> tuple[float, float]:
    """Median seconds of ``baseline`` and ``ours``, alternating, after one warm-up each."""
    baseline(), ours()
    b, o = [], []
    for _ in range(rounds):
        b.append(_timed(baseline))
        o.append(_timed(ours))
        tick()
    return statistics.median(b), statistics.median(o)


def _payloads(layout: ChunkLayout, n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, layout.nbytes, dtype=np.uint8) for _ in range(n)]


def _keys(n: int, salt: str) -> list[bytes]:
    ns = Namespace(f"bench-{salt}-{time.time_ns()}", "bfloat16", 1, 1, 1)
    return chunk_keys(ns, np.arange(n * 16) % 50000, 16)


def bench_cpu(layout: ChunkLayout, n: int, rounds: int, tick: Callable[[], None]) -> dict[str, Any]:
    data = _payloads(layout, n)
    out = np.empty(layout.nbytes, dtype=np.uint8)
    staging = [np.empty_like(d) for d in data]
    config = KVTierConfig(tiers=("cpu",), cpu_bytes=(n + 1) * layout.nbytes)
    store = Store(config, layout, pin=False)

    def baseline() -> None:
        for d, s in zip(data, staging):
            np.copyto(s, d)
            np.copyto(out, s)

    def ours() -> None:
        keys = _keys(n, "cpu")
        for k, d in zip(keys, data):
            store.put(k, d)
        for ref in store.get(keys):
            copy_bytes(out, ref.data)
            ref.release()
        store.cpu.delete(keys)

    b, o = _side_by_side(baseline, ours, rounds, tick)
    store.close()
    moved = 2 * n * layout.nbytes
    return {"tier": "cpu", "op": "put+get", "baseline": "2x memcpy", "baseline_GBps": _gbps(moved, b),
            "kvtier_GBps": _gbps(moved, o), "ratio": b / o, "goal": 0.8}


def _bench_lower(tier: Tier, name: str, layout: ChunkLayout, n: int, rounds: int, tick: Callable[[], None],
                 raw_write: Callable[[list[bytes], list[np.ndarray]], None],
                 raw_read: Callable[[list[bytes], list[np.ndarray]], None], baseline_name: str,
                 goal: float) -> list[dict[str, Any]]:
    data = _payloads(layout, n)
    dests = [np.empty_like(d) for d in data]
    raw_keys = [f"raw-{i}".encode() for i in range(n)]
    keys = _keys(n, name)
    results = []
    bw, ow = _side_by_side(lambda: raw_write(raw_keys, data), lambda: tier.put(keys, data), rounds, tick)
    results.append({"tier": name, "op": "write", "baseline": baseline_name + " write",
                    "baseline_GBps": _gbps(n * layout.nbytes, bw), "kvtier_GBps": _gbps(n * layout.nbytes, ow),
                    "ratio": bw / ow, "goal": goal})

    def ours_read() -> None:
        ok = tier.get_into(keys, dests)
        if not all(ok):
            raise RuntimeError(f"{name} tier lost chunks during the benchmark: {ok.count(False)} misses")

    br, orr = _side_by_side(lambda: raw_read(raw_keys, dests), ours_read, rounds, tick)
    if not all(np.array_equal(d, x) for d, x in zip(data, dests)):
        raise RuntimeError(f"{name} tier returned wrong bytes")
    results.append({"tier": name, "op": "read", "baseline": baseline_name + " read",
                    "baseline_GBps": _gbps(n * layout.nbytes, br), "kvtier_GBps": _gbps(n * layout.nbytes, orr),
                    "ratio": br / orr, "goal": goal})
    tier.delete(keys)
    return results


def bench_disk(layout: ChunkLayout, n: int, rounds: int, tick: Callable[[], None], path: str | None
               ) -> list[dict[str, Any]]:
    from kvtier.tiers.disk import DiskTier

    with tempfile.TemporaryDirectory(dir=path) as d:
        raw_dir = os.path.join(d, "raw")
        os.makedirs(raw_dir)
        tier = DiskTier(os.path.join(d, "tier"), 4 * n * layout.nbytes, layout, label="bench")

        def raw_write(keys: list[bytes], data: list[np.ndarray]) -> None:
            for k, x in zip(keys, data):
                with open(os.path.join(raw_dir, k.decode()), "wb") as f:
                    f.write(x)

        def raw_read(keys: list[bytes], dests: list[np.ndarray]) -> None:
            for k, x in zip(keys, dests):
                with open(os.path.join(raw_dir, k.decode()), "rb", buffering=0) as f:
                    f.readinto(x)

        try:
            return _bench_lower(tier, "disk", layout, n, rounds, tick, raw_write, raw_read, "raw file", 0.8)
        finally:
            tier.close()


def bench_redis(layout: ChunkLayout, n: int, rounds: int, tick: Callable[[], None], url: str
                ) -> list[dict[str, Any]]:
    import redis

    from kvtier.tiers.redis import RedisTier

    client = redis.Redis.from_url(url)
    tier = RedisTier([url], layout, label="bench")

    def raw_write(keys: list[bytes], data: list[np.ndarray]) -> None:
        pipe = client.pipeline(transaction=False)
        for k, x in zip(keys, data):
            pipe.set(k, x.tobytes())
        pipe.execute()

    def raw_read(keys: list[bytes], dests: list[np.ndarray]) -> None:
        values = client.mget(keys)
        for v, x in zip(values, dests):
            np.copyto(x, np.frombuffer(v, dtype=np.uint8))

    try:
        return _bench_lower(tier, "redis", layout, n, rounds, tick, raw_write, raw_read, "redis-py", 0.9)
    finally:
        client.delete(*[f"raw-{i}".encode() for i in range(n)])
        tier.close()
        client.close()


def bench_lookup(prompt_tokens: int = 32768, chunk_size: int = 256, rounds: int = 200) -> dict[str, Any]:
    """Keys + lookup of a fully cached prompt (cpu tier), vs the time to load its KV at 50 GB/s."""
    layout = ChunkLayout(32, chunk_size, 1024, torch.bfloat16)
    tiny = ChunkLayout(1, chunk_size, 16, torch.float16)  # the lookup never touches payload bytes
    ns = Namespace("llama-3.1-8b", "bfloat16", 32, 8, 128)
    tokens = np.random.default_rng(1).integers(0, 128000, prompt_tokens)
    n = prompt_tokens // chunk_size
    store = Store(KVTierConfig(tiers=("cpu",), cpu_bytes=(n + 1) * tiny.nbytes), tiny, pin=False)
    for k in chunk_keys(ns, tokens, chunk_size):
        store.put(k, np.zeros(tiny.nbytes, dtype=np.uint8))
    key_times, lookup_times = [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        keys = chunk_keys(ns, tokens, chunk_size)
        t1 = time.perf_counter()
        hit = store.lookup(keys)
        t2 = time.perf_counter()
        key_times.append(t1 - t0)
        lookup_times.append(t2 - t1)
    store.close()
    assert hit == n
    budget = prompt_tokens * layout.nbytes / chunk_size / 50e9 * 0.01
    total = statistics.median(key_times) + statistics.median(lookup_times)
    return {"tier": "keys+lookup", "op": f"{prompt_tokens} tokens", "keys_ms": statistics.median(key_times) * 1e3,
            "lookup_ms": statistics.median(lookup_times) * 1e3, "total_ms": total * 1e3,
            "budget_ms": budget * 1e3, "ratio": budget / total, "goal": 1.0}
