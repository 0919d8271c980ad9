"""Write-behind under a lower tier slower than the puts (issue 14.1): does the queue starve the cpu tier?

A Store with a cpu tier of 256 slots (64 MiB of 256 KiB chunks), alone and above a real disk
tier slowed to 2 ms a write; 2 threads doing 40 % put / 60 % lookup+get over 4,000 keys with
skewed popularity, for --seconds. Reports puts accepted / refused, hits, and "lookup said hit,
get missed" (the starvation symptom), per configuration.

    .venv/bin/python benchmarks/bench_write_behind.py --json benchmarks/results/write_behind.json
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import threading
import time

import numpy as np
import torch

from _common import merge_json

from kvtier.config import KVTierConfig
from kvtier.layout import ChunkLayout
from kvtier.store import Store
from kvtier.tiers.disk import DiskTier

LAYOUT = ChunkLayout(8, 256, 64, torch.float16)  # 256 KiB chunks


class SlowDisk(DiskTier):
    """A real disk tier whose writes take at least ``delay_s`` each (a disk slower than the puts)."""

    delay_s = 0.002

    def put(self, keys, payloads):
        time.sleep(self.delay_s * len(keys))
        return super().put(keys, payloads)


def run(name: str, lower: list, seconds: float, depth: int) -> dict:
    config = KVTierConfig(tiers=("cpu",), cpu_bytes=256 * LAYOUT.nbytes, write_queue_depth=depth)
    store = Store(config, LAYOUT, pin=False, tiers=lower)
    keys = [i.to_bytes(16, "little") for i in range(4000)]
    payload = np.zeros(LAYOUT.nbytes, dtype=np.uint8)
    counts = {"puts_ok": 0, "puts_refused": 0, "lookups": 0, "hits": 0, "lookup_hit_get_miss": 0}
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def worker(seed: int) -> None:
        rnd = random.Random(seed)
        local = dict.fromkeys(counts, 0)
        while time.monotonic() < stop:
            k = keys[min(int(rnd.paretovariate(1.2)) - 1, len(keys) - 1) if rnd.random() < 0.7
                     else rnd.randrange(len(keys))]
            if rnd.random() < 0.4:
                local["puts_ok" if store.put(k, payload) else "puts_refused"] += 1
            else:
                local["lookups"] += 1
                if store.lookup([k]):
                    (ref,) = store.get([k])
                    if ref is None:
                        local["lookup_hit_get_miss"] += 1
                    else:
                        local["hits"] += 1
                        ref.release()
        with lock:
            for key, v in local.items():
                counts[key] += v

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    counts["dropped_writes"] = store.metrics.value("kvtier_dropped_writes_total")
    counts["cpu_chunks_at_end"] = store.cpu.stats().chunks
    store.close(30)
    puts = counts["puts_ok"] + counts["puts_refused"]
    counts["put_success"] = counts["puts_ok"] / puts if puts else None
    counts["hit_rate"] = counts["hits"] / counts["lookups"] if counts["lookups"] else None
    print(f"{name:>28}: puts ok {counts['put_success']:.1%}, hits {counts['hit_rate']:.1%} of lookups, "
          f"lookup-hit/get-miss {counts['lookup_hit_get_miss']}, dropped writes {counts['dropped_writes']:.0f}, "
          f"cpu chunks at end {counts['cpu_chunks_at_end']}", flush=True)
    return counts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--json", default=None)
    ap.add_argument("--label", default="", help="name of this run in the JSON (e.g. before / after)")
    args = ap.parse_args()
    out = {"command": "python " + " ".join(sys.argv), "label": args.label, "seconds": args.seconds,
           "chunk_bytes": LAYOUT.nbytes, "cpu_slots": 256, "disk_write_delay_s": SlowDisk.delay_s, "runs": {}}
    out["runs"]["cpu_only"] = run("cpu only", [], args.seconds, 256)
    with tempfile.TemporaryDirectory() as d:
        out["runs"]["cpu_slow_disk_depth256"] = run(
            "cpu + slow disk (depth 256)", [SlowDisk(d, 1 << 40, LAYOUT)], args.seconds, 256)
    merge_json(args.json, args.label or "run", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
