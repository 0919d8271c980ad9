"""Disk-tier costs that grew with load (issue 17.2 and 17.3), each against a baseline measured in the same run.

1. A lookup miss: a 128K-token prompt (512 chunks of 256 tokens) that no tier holds, looked up
   through a Store with cpu + disk tiers (the disk tier holding ``--chunks`` other chunks).
   Baseline: the same lookup with the cpu tier alone. Goal: ≤ 0.1 ms.
2. Opening a disk tier whose cap was halved since the last run (``--chunks`` files): how long
   until the tier serves, and until the excess files are gone. Baseline: opening it at its old cap.
3. While that trim removes files behind (issue 29): the latency of a 512-key ``contains`` (p99) and
   of a ``put`` (max). Baseline: the same once the trim is done.

    .venv/bin/python benchmarks/bench_disk_costs.py --label after --json benchmarks/results/disk_costs.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time

import numpy as np
import torch

from _common import median_s, merge_json

from kvtier.config import KVTierConfig
from kvtier.layout import ChunkLayout
from kvtier.store import Store
from kvtier.tiers.disk import DiskTier

LAYOUT = ChunkLayout(1, 16, 8, torch.float16)  # 256-byte chunks: many files, little disk
PROMPT_CHUNKS = 512  # 128K tokens in chunks of 256


def key(i: int) -> bytes:
    return i.to_bytes(16, "little")


def fill(root: str, n: int) -> int:
    """Write ``n`` chunks under ``root``; the tier's file size."""
    tier = DiskTier(root, 2 * n * (LAYOUT.nbytes + 4096), LAYOUT)
    payload = np.zeros(LAYOUT.nbytes, dtype=np.uint8)
    for i in range(n):
        tier.put([key(i)], [payload])
    tier.close()
    return tier.file_bytes


def lookup_miss(root: str, chunks: int, file_bytes: int, reps: int) -> dict:
    config = KVTierConfig(tiers=("cpu",), cpu_bytes=64 * LAYOUT.nbytes)
    miss = [key(10**9 + i) for i in range(PROMPT_CHUNKS)]
    cpu_only = Store(config, LAYOUT, pin=False)
    disk = DiskTier(root, 2 * chunks * file_bytes, LAYOUT)
    both = Store(config, LAYOUT, pin=False, tiers=[disk])
    assert cpu_only.lookup(miss) == 0 and both.lookup(miss) == 0
    row = {"prompt_chunks": PROMPT_CHUNKS, "disk_chunks": chunks,
           "cpu_only_us": median_s(lambda: cpu_only.lookup(miss), reps) * 1e6,
           "cpu_disk_us": median_s(lambda: both.lookup(miss), reps) * 1e6}
    row["goal_us"] = 100.0
    cpu_only.close(10)
    both.close(10)
    return row


def reopen_halved(root: str, chunks: int, file_bytes: int) -> dict:
    t = time.perf_counter()
    DiskTier(root, chunks * file_bytes, LAYOUT).close()
    same_cap_s = time.perf_counter() - t
    t = time.perf_counter()
    tier = DiskTier(root, chunks // 2 * file_bytes, LAYOUT)
    serving_s = time.perf_counter() - t
    during = ops_while(tier, lambda: tier._trimmer is not None and tier._trimmer.is_alive())
    wait = getattr(tier, "wait_trimmed", None)  # absent before issue 17.3: the trim ran in the constructor
    if wait is not None:
        assert wait(600)
    trimmed_s = time.perf_counter() - t
    assert tier.stats().chunks <= chunks // 2
    deadline = time.perf_counter() + 2.0
    after = ops_while(tier, lambda: time.perf_counter() < deadline)
    tier.close()
    return {"chunks": chunks, "open_same_cap_s": same_cap_s, "open_halved_serving_s": serving_s,
            "open_halved_trimmed_s": trimmed_s, "during_trim": during, "after_trim": after}


def ops_while(tier: DiskTier, going) -> dict:
    """p99 of a 512-key ``contains`` and max of a ``put``, in turns, while ``going()``."""
    keys = [key(i) for i in range(0, 2 * PROMPT_CHUNKS, 2)]
    payload = np.zeros(LAYOUT.nbytes, dtype=np.uint8)
    contains, puts, n = [], [], 0
    while going():
        t = time.perf_counter()
        tier.contains(keys)
        contains.append(time.perf_counter() - t)
        t = time.perf_counter()
        tier.put([key(2 * 10**9 + n)], [payload])
        puts.append(time.perf_counter() - t)
        n += 1
    if not contains:
        return {"ops": 0}
    return {"ops": n, "contains_p99_ms": float(np.percentile(contains, 99)) * 1e3,
            "put_max_ms": max(puts) * 1e3, "put_p99_ms": float(np.percentile(puts, 99)) * 1e3}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chunks", type=int, default=50_000)
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--json", default=None)
    ap.add_argument("--label", default="run")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as root:
        t = time.perf_counter()
        file_bytes = fill(root, args.chunks)
        print(f"wrote {args.chunks} chunks in {time.perf_counter() - t:.1f} s", flush=True)
        miss = lookup_miss(root, args.chunks, file_bytes, args.reps)
        print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in miss.items()}), flush=True)
        trim = reopen_halved(root, args.chunks, file_bytes)
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in trim.items()}), flush=True)
    merge_json(args.json, args.label, {"command": "python " + " ".join(sys.argv), "lookup_miss": miss,
                                       "reopen_halved": trim})
    return 0


if __name__ == "__main__":
    sys.exit(main())
