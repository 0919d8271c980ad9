"""`kvtier serve` against the in-process Store, in one run.

1. lookup round trip (p50, p99) through the server vs in-process;
2. load (get + copy out + release) and save (allocate + fill + commit) throughput
   through the server vs in-process, same chunks, alternating rounds (median);
3. concurrent client processes doing lookups: at how many does p99 double.

    python benchmarks/bench_server.py --out benchmarks/results/server.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch

from _common import pct, start_server, start_workers, stop_workers

from kvtier.config import KVTierConfig
from kvtier.hostcopy import copy_bytes
from kvtier.layout import ChunkLayout
from kvtier.store import Store

SHAPES = {
    "llama8b": dict(num_layers=32, width=8 * 128, dtype=torch.bfloat16),  # 32 MiB chunks of 256 tokens
    "small": dict(num_layers=4, width=8 * 128, dtype=torch.bfloat16),  # 4 MiB
    "tiny": dict(num_layers=2, width=2 * 32, dtype=torch.float32),  # 256 KiB (the test model's shape)
}


def key(i: int) -> bytes:
    return i.to_bytes(16, "little")


def lookup_latencies(store, keys: list[bytes], n: int) -> list[float]:
    for _ in range(min(200, n)):
        store.lookup(keys)
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        store.lookup(keys)
        out.append(time.perf_counter() - t0)
    return out


def _sync(t: torch.Tensor) -> None:
    if t.is_cuda:
        torch.cuda.synchronize()


def load_round(store, keys: list[bytes], dst: torch.Tensor) -> float:
    """get all, copy each slot to ``dst`` (host or GPU), wait, release all."""
    t0 = time.perf_counter()
    refs = store.get(keys)
    for i, r in enumerate(refs):
        copy_bytes(dst[i], r.data, non_blocking=True)  # host: one-thread memcpy; GPU: DMA
    _sync(dst)
    for r in refs:
        r.release()
    return time.perf_counter() - t0


def save_round(store, keys: list[bytes], src: torch.Tensor) -> float:
    """Per chunk: allocate, copy from ``src`` (host or GPU), wait, commit (like the connector's save)."""
    t0 = time.perf_counter()
    for i, k in enumerate(keys):
        r = store.allocate()
        copy_bytes(r.data, src[i], non_blocking=True)
        _sync(src)
        store.commit(k, r)
    return time.perf_counter() - t0


def _lookup_worker(addr: str, layout: ChunkLayout, keys: list[bytes], conn) -> None:
    from kvtier.server.client import RemoteStore

    store = RemoteStore(KVTierConfig(server=addr), layout, "bench", pin=False)
    conn.send("ready")
    while True:
        cmd = conn.recv()
        if cmd is None:
            break
        start_at, duration = cmd
        while time.time() < start_at:
            time.sleep(0.0005)
        lat, end = [], time.time() + duration
        while time.time() < end:
            t0 = time.perf_counter()
            store.lookup(keys)
            lat.append(time.perf_counter() - t0)
        conn.send(lat)
    store.close()


def concurrency(addr: str, layout: ChunkLayout, keys: list[bytes], levels: list[int], duration: float) -> list[dict]:
    pipes, procs = start_workers(_lookup_worker, [(addr, layout, keys)] * max(levels))
    rows = []
    for k in levels:
        start_at = time.time() + 0.2
        for a in pipes[:k]:
            a.send((start_at, duration))
        lat = [x for a in pipes[:k] for x in a.recv()]
        rows.append({"clients": k, "lookups_per_s": len(lat) / duration, "p50_us": pct(lat, 50) * 1e6,
                     "p99_us": pct(lat, 99) * 1e6})
        print(f"  {k:3d} clients: p50 {rows[-1]['p50_us']:.0f} us  p99 {rows[-1]['p99_us']:.0f} us  "
              f"{rows[-1]['lookups_per_s']:.0f} lookups/s", file=sys.stderr)
    stop_workers(pipes, procs, 10)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="small")
    ap.add_argument("--chunk-size", type=int, default=256)
    ap.add_argument("--chunks", type=int, default=32, help="Chunks per load/save round.")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--lookup-keys", type=int, default=32, help="Keys per lookup (32 x 256 = an 8K-token prefix).")
    ap.add_argument("--lookups", type=int, default=3000)
    ap.add_argument("--levels", default="1,2,4,8,16", help="Concurrent client processes to try.")
    ap.add_argument("--duration", type=float, default=2.0, help="Seconds of lookups per concurrency level.")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="Where loads copy to and saves copy from (cuda: host slots pinned, H2D/D2H).")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from kvtier.server.client import RemoteStore

    spec = SHAPES[args.shape]
    layout = ChunkLayout(spec["num_layers"], args.chunk_size, spec["width"], spec["dtype"])
    n = args.chunks
    cpu_bytes = 4 * n * layout.nbytes
    tmp = tempfile.mkdtemp(prefix="kvb-", dir="/tmp")
    addr = f"ipc://{tmp}/s.sock"
    proc = start_server(addr, cpu_bytes)
    result: dict = {
        "command": "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]),
        "layout": layout.describe(), "chunk_bytes": layout.nbytes, "chunks": n, "rounds": args.rounds,
        "cpu_count": os.cpu_count(), "cuda": torch.cuda.is_available(), "torch": torch.__version__,
        "python": sys.version.split()[0],
        "note": "ratio = server / in-process (throughput) or in-process / server (latency is reported raw).",
    }
    try:
        pin = args.device == "cuda"
        local = Store(KVTierConfig(tiers=("cpu",), cpu_bytes=cpu_bytes), layout, "bench", pin=pin)
        remote = RemoteStore(KVTierConfig(server=addr, op_timeout_s=30), layout, "bench", pin=pin)
        assert remote.connected
        result["device"] = args.device
        result["pinned"] = {"in_process": local.pool.pinned, "server_mapping": remote._region.pinned}
        if args.device == "cuda":
            result["gpu"] = torch.cuda.get_device_name()
        src = torch.randint(0, 256, (n, layout.nbytes), dtype=torch.uint8, device=args.device)
        dst = torch.empty_like(src)
        keys = [key(i) for i in range(n)]
        save_round(local, keys, src)
        save_round(remote, keys, src)

        # 1. lookup round trip
        lk = keys[:args.lookup_keys] if args.lookup_keys <= n else keys + [key(10**6 + i) for i in range(args.lookup_keys - n)]
        lat_local = lookup_latencies(local, lk, args.lookups)
        lat_remote = lookup_latencies(remote, lk, args.lookups)
        result["lookup"] = {
            "keys": len(lk),
            "in_process_p50_us": pct(lat_local, 50) * 1e6, "in_process_p99_us": pct(lat_local, 99) * 1e6,
            "server_p50_us": pct(lat_remote, 50) * 1e6, "server_p99_us": pct(lat_remote, 99) * 1e6,
        }
        print(f"lookup of {len(lk)} keys: in-process p50 {result['lookup']['in_process_p50_us']:.1f} us, "
              f"server p50 {result['lookup']['server_p50_us']:.1f} us p99 {result['lookup']['server_p99_us']:.1f} us",
              file=sys.stderr)

        # 2. load and save throughput, alternating rounds
        times: dict[str, list[float]] = {"load_local": [], "load_server": [], "save_local": [], "save_server": []}
        for r in range(args.rounds):
            ks = [key(1000 * (r + 1) + i) for i in range(n)]  # fresh keys per save round
            times["save_local"].append(save_round(local, ks, src))
            times["save_server"].append(save_round(remote, ks, src))
            times["load_local"].append(load_round(local, ks, dst))
            times["load_server"].append(load_round(remote, ks, dst))
            assert torch.equal(dst, src)
        total = n * layout.nbytes
        gbps = {k: total / statistics.median(v) / 1e9 for k, v in times.items()}
        result["throughput"] = {
            "load_in_process_GBps": gbps["load_local"], "load_server_GBps": gbps["load_server"],
            "load_ratio": gbps["load_server"] / gbps["load_local"],
            "save_in_process_GBps": gbps["save_local"], "save_server_GBps": gbps["save_server"],
            "save_ratio": gbps["save_server"] / gbps["save_local"], "goal_ratio": 0.8,
            "per_chunk_ops": "load: one get round trip for all chunks, per chunk copy, wait, release (batched, "
                             "one-way); save: per chunk allocate (one round trip per 8 chunks: the client keeps a "
                             "reserve) + copy + wait + commit (one-way, no round trip)",
        }
        print("throughput:", json.dumps(result["throughput"], indent=1), file=sys.stderr)
        remote.close()
        local.close()

        # 3. concurrency
        levels = [int(x) for x in args.levels.split(",")]
        rows = concurrency(addr, layout, lk, levels, args.duration)
        base = rows[0]["p99_us"]
        doubled = next((r["clients"] for r in rows if r["p99_us"] >= 2 * base), None)
        result["concurrency"] = {"levels": rows, "p99_doubles_at_clients": doubled,
                                 "note": "each client a process doing back-to-back lookups; null = never doubled "
                                         "within the levels tried"}
    finally:
        proc.terminate()
        proc.wait(30)
        shutil.rmtree(tmp, ignore_errors=True)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
