"""How long kvtier's background threads stop the engine's own thread (the GIL), with and without
the GIL-free checksum, in one run.

An "engine" thread runs short pieces of Python work (like a scheduler step's bookkeeping) and
records the gaps between them, while kvtier writes 32 MiB chunks behind (cpu tier -> disk tier,
each chunk checksummed for its header). Baseline: the same loop with no writes. Reported: the stalls
(gaps over 0.5 ms): how many, their total per second, and the longest.

    python benchmarks/bench_gil.py --out benchmarks/results/gil.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time

import numpy as np
import torch

import kvtier.layout as layout_mod
from kvtier.config import KVTierConfig
from kvtier.layout import ChunkLayout
from kvtier.store import Store

LAYOUT = ChunkLayout(32, 256, 1024, torch.bfloat16)  # Llama-8B: 32 MiB per 256-token chunk


def gaps_ms(seconds: float) -> list[float]:
    """Run short Python work for ``seconds``; the time between consecutive pieces (ms)."""
    out = []
    last = time.perf_counter()
    end = last + seconds
    while last < end:
        sum(range(200))  # ~5 us of Python, holding the GIL like an engine's bookkeeping
        now = time.perf_counter()
        out.append((now - last) * 1e3)
        last = now
    return out


def case(name: str, writes: bool, gil_free: bool, seconds: float, root: str) -> dict:
    saved = layout_mod._XXH3
    if not gil_free:
        layout_mod._XXH3 = None
    config = KVTierConfig(tiers=("cpu", "disk"), cpu_bytes=24 * LAYOUT.nbytes, disk_path=root,
                          disk_bytes=64 * (LAYOUT.nbytes + 8192))
    store = Store(config, LAYOUT, pin=False)
    payload = torch.randint(0, 255, (LAYOUT.nbytes,), dtype=torch.uint8)
    stop = threading.Event()
    written = [0]

    def writer() -> None:
        i = 0
        while not stop.is_set():
            store.put(os.urandom(16), payload)
            store.flush(10)
            written[0] += 1
            i += 1

    th = threading.Thread(target=writer, daemon=True)
    if writes:
        th.start()
        time.sleep(0.2)
    g = np.asarray(gaps_ms(seconds))
    stop.set()
    if writes:
        th.join()
    store.close(10)
    layout_mod._XXH3 = saved
    long = g[g > 0.5]
    row = {"case": name, "chunks_written": written[0], "stalls_over_0.5ms": int(long.size),
           "stalled_ms_per_s": float(long.sum() / seconds), "gap_p999_ms": float(np.percentile(g, 99.9)),
           "gap_max_ms": float(g.max())}
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if layout_mod._XXH3 is None:
        print("this xxhash build does not export XXH3_64bits: nothing to compare", file=sys.stderr)
        return 1
    rows = []
    with tempfile.TemporaryDirectory() as root:
        rows.append(case("no writes", False, True, args.seconds, root))
        for rep in range(2):
            rows.append(case("writes, xxhash Python API (GIL held)", True, False, args.seconds, root))
            rows.append(case("writes, GIL-free checksum", True, True, args.seconds, root))
    doc = {"command": "python " + " ".join(sys.argv), "cpu_count": os.cpu_count(), "chunk_bytes": LAYOUT.nbytes,
           "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(doc, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
