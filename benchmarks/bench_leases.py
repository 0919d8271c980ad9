"""Leases and eviction as open leases pile up (issue 17.1): put and lease() latency at 0, 1K, 10K, 100K open leases.

A full cpu tier (and a full disk tier) whose least recently used chunks are leased (a lease per
chunk, as a scheduler holds them for loads in flight), then: median latency of a put that must
evict, and of one more ``lease()`` call. Goal: flat (O(1) amortized) in the number of open leases.

    .venv/bin/python benchmarks/bench_leases.py --label after --json benchmarks/results/leases.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

from _common import merge_json

from kvtier.config import KVTierConfig
from kvtier.layout import ChunkLayout
from kvtier.store import Store
from kvtier.tiers.disk import DiskTier

LAYOUT = ChunkLayout(1, 16, 8, torch.float16)  # 256-byte chunks: many of them, little memory


def key(i: int) -> bytes:
    return i.to_bytes(16, "little")


def measure(open_leases: int, with_disk: bool, reps: int = 300) -> dict:
    slots = open_leases + 2000
    lower = []
    tmp = tempfile.TemporaryDirectory()
    if with_disk:
        lower = [DiskTier(tmp.name, slots * (LAYOUT.nbytes + 4096), LAYOUT)]
    config = KVTierConfig(tiers=("cpu",), cpu_bytes=slots * LAYOUT.nbytes, lease_ttl_s=3600)
    store = Store(config, LAYOUT, pin=False, tiers=lower)
    if lower:
        lower[0].protected = store.is_leased
        lower[0].capacity = slots * lower[0].file_bytes
    payload = np.zeros(LAYOUT.nbytes, dtype=np.uint8)
    disk = lower[0] if lower else None
    for i in range(slots):  # fill the cpu tier (and the disk tier, directly)
        store.put(key(i), payload)
        if disk is not None:
            disk.put([key(i)], [payload])
    store.flush(60)
    leases = [store.lease([key(i)]) for i in range(open_leases)]  # the oldest chunks are leased
    put_s, lease_s, disk_put_s = [], [], []
    n = slots
    for _ in range(reps):
        t = time.perf_counter()
        store.put(key(n), payload)  # evicts past every leased chunk
        put_s.append(time.perf_counter() - t)
        if disk is not None:
            t = time.perf_counter()
            disk.put([key(n)], [payload])
            disk_put_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        leases.append(store.lease([key(n)]))
        lease_s.append(time.perf_counter() - t)
        leases.pop().release()
        n += 1
    for lease in leases:
        lease.release()
    store.close(10)
    tmp.cleanup()
    row = {"open_leases": open_leases, "cpu_put_us": statistics.median(put_s) * 1e6,
           "lease_us": statistics.median(lease_s) * 1e6}
    if disk_put_s:
        row["disk_put_us"] = statistics.median(disk_put_s) * 1e6
    print(json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--leases", default="0,1000,10000,100000")
    ap.add_argument("--json", default=None)
    ap.add_argument("--label", default="run")
    args = ap.parse_args()
    rows = [measure(int(n), with_disk=True) for n in args.leases.split(",")]
    merge_json(args.json, args.label, {"command": "python " + " ".join(sys.argv), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
