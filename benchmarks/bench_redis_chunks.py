"""The redis tier with 1, 4 and 32 MiB chunks, 1 and 4 threads, against plain redis-py, in one run.

Starts its own redis-server on 127.0.0.1 (a free port, no persistence). For each chunk size
and thread count, every thread puts ``--batch`` chunks in one call, then gets them in one call
(its own keys; all threads start each phase together), ``--rounds`` times; the variants take
turns within each round:

* ``kvtier``: ``RedisTier.put`` / ``get_into`` with default settings (``op_timeout_s`` 2 s):
  header, checksum, copy into the destination; a call that fails counts in ``failed_calls``;
* ``kvtier-one-value``: the same, each chunk stored as one value (``piece_bytes=chunk``;
  skipped where the tier has no such argument);
* ``redis-py``: one pipeline of SET / GET of each payload, GET copied into the destination;
* ``redis-py-pieces``: the same with each payload in ``--piece-mib`` values.

Each round starts with another variant (what a variant leaves behind, such as Redis freeing
deleted values in the background, falls on each in turn).

GB/s counts the bytes of successful calls of all threads over the phase's wall time; per call
latencies give p50 / max and how many took more than 2 s (the default ``op_timeout_s``).
``redis-benchmark`` (if installed) adds SET/GET with values of each size.

    python benchmarks/bench_redis_chunks.py --label after --out benchmarks/results/redis_chunks_cpu2.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time

import numpy as np
import redis
import torch

from _common import merge_json

from kvtier.layout import ChunkLayout
from kvtier.local_redis import RedisServer
from kvtier.tiers.redis import RedisTier


def chunk_key(*parts: object) -> bytes:
    """A 16-byte chunk key, like kvtier's (the header holds 16 bytes of key)."""
    return hashlib.blake2b(repr(parts).encode(), digest_size=16).digest()


def layout_of(mib: int) -> ChunkLayout:
    return ChunkLayout(mib, 256, 1024, torch.bfloat16)  # [2, mib, 256, 1024] bf16 = mib MiB


class Plain:
    """redis-py SET / GET pipelines of whole payloads, or of ``piece`` bytes each."""

    def __init__(self, url: str, nbytes: int, piece: int) -> None:
        self.client = redis.Redis.from_url(url, socket_timeout=300)
        self.nbytes, self.piece = nbytes, piece

    def _names(self, key: bytes) -> list[bytes]:
        return [b"raw:%s:%d" % (key.hex().encode(), i) for i in range(-(-self.nbytes // self.piece))]

    def put(self, keys, payloads) -> list[bool]:
        pipe = self.client.pipeline(transaction=False)
        for k, p in zip(keys, payloads):
            mv = memoryview(p)
            for i, name in enumerate(self._names(k)):
                pipe.set(name, mv[i * self.piece:(i + 1) * self.piece])
        pipe.execute()
        return [True] * len(keys)

    def get_into(self, keys, dests) -> list[bool]:
        pipe = self.client.pipeline(transaction=False)
        for k in keys:
            for name in self._names(k):
                pipe.get(name)
        values = iter(pipe.execute())
        for k, d in zip(keys, dests):
            for i in range(len(self._names(k))):
                d[i * self.piece:(i + 1) * self.piece] = np.frombuffer(next(values), dtype=np.uint8)
        return [True] * len(keys)

    def delete(self, keys) -> None:
        self.client.delete(*[n for k in keys for n in self._names(k)])

    def close(self) -> None:
        self.client.close()


def make_variants(url: str, layout: ChunkLayout, piece: int) -> dict:
    out = {"kvtier": RedisTier([url], layout, label="bench")}
    try:
        out["kvtier-one-value"] = RedisTier([url], layout, label="bench", piece_bytes=layout.nbytes)
    except TypeError:  # a tier without pieces: "kvtier" is already one value per chunk
        pass
    out["redis-py"] = Plain(url, layout.nbytes, layout.nbytes)
    out["redis-py-pieces"] = Plain(url, layout.nbytes, piece)
    return out


def phase(store, op: str, keys: list[list[bytes]], bufs: list[list[np.ndarray]]) -> tuple[float, list, list]:
    """All threads call ``op`` once, started together: (wall s, per-call s, per-call ok lists)."""
    lat: list[float] = [0.0] * len(keys)
    oks: list = [None] * len(keys)
    start = threading.Barrier(len(keys) + 1)

    def run(t: int) -> None:
        start.wait()
        t0 = time.perf_counter()
        oks[t] = getattr(store, op)(keys[t], bufs[t])
        lat[t] = time.perf_counter() - t0

    threads = [threading.Thread(target=run, args=(t,)) for t in range(len(keys))]
    for th in threads:
        th.start()
    start.wait()
    t0 = time.perf_counter()
    for th in threads:
        th.join()
    return time.perf_counter() - t0, lat, oks


def bench_case(url: str, mib: int, nthreads: int, args) -> dict:
    layout = layout_of(mib)
    piece = args.piece_mib << 20
    variants = make_variants(url, layout, piece)
    rng = np.random.default_rng(mib)
    payloads = [rng.integers(0, 256, layout.nbytes, dtype=np.uint8) for _ in range(args.batch)]
    dests = [[np.zeros(layout.nbytes, dtype=np.uint8) for _ in range(args.batch)] for _ in range(nthreads)]
    acc = {name: {"put_s": 0.0, "get_s": 0.0, "put_bytes": 0, "get_bytes": 0, "put_calls": [], "get_calls": [],
                  "failed_calls": 0, "wrong_bytes": 0} for name in variants}
    try:
        for r in range(args.rounds):
            order = list(variants.items())
            for name, store in order[r % len(order):] + order[:r % len(order)]:  # no variant always first
                keys = [[chunk_key(name, mib, t, r, i) for i in range(args.batch)] for t in range(nthreads)]
                a = acc[name]
                for op, bufs in (("put", [payloads] * nthreads), ("get_into", dests)):
                    for d in (dests if op == "get_into" else []):
                        for x in d:
                            x.fill(0)  # a get that claims a hit without writing must show
                    wall, lat, oks = phase(store, op, keys, bufs)
                    tag = "put" if op == "put" else "get"
                    a[f"{tag}_s"] += wall
                    a[f"{tag}_calls"] += lat
                    good = [sum(o) for o in oks]
                    a[f"{tag}_bytes"] += sum(good) * layout.nbytes
                    a["failed_calls"] += sum(g < args.batch for g in good)
                for t in range(nthreads):
                    for ok, d, p in zip(oks[t], dests[t], payloads):
                        a["wrong_bytes"] += bool(ok) and not np.array_equal(d, p)
                    store.delete(keys[t])
    finally:
        for store in variants.values():
            store.close()
    rows = {}
    for name, a in acc.items():
        rows[name] = {
            "put_GBps": a["put_bytes"] / a["put_s"] / 1e9, "get_GBps": a["get_bytes"] / a["get_s"] / 1e9,
            "put_call_p50_s": statistics.median(a["put_calls"]), "put_call_max_s": max(a["put_calls"]),
            "get_call_p50_s": statistics.median(a["get_calls"]), "get_call_max_s": max(a["get_calls"]),
            "calls_over_2s": sum(x > 2.0 for x in a["put_calls"] + a["get_calls"]),
            "failed_calls": a["failed_calls"], "wrong_bytes": a["wrong_bytes"],
        }
    base = rows["redis-py"]
    for row in rows.values():
        row["put_ratio_to_redis_py"] = row["put_GBps"] / base["put_GBps"]
        row["get_ratio_to_redis_py"] = row["get_GBps"] / base["get_GBps"]
    return rows


def redis_benchmark(port: int, mib: int, clients: int, requests: int) -> dict | None:
    exe = shutil.which("redis-benchmark")
    if exe is None:
        return None
    size = mib << 20
    r = subprocess.run([exe, "-h", "127.0.0.1", "-p", str(port), "-t", "set,get", "-d", str(size),
                        "-n", str(requests), "-c", str(clients), "--csv"], capture_output=True, text=True, timeout=600)
    out = {}
    for line in r.stdout.splitlines():
        cells = [c.strip('"') for c in line.split(",")]
        if cells and cells[0] in ("SET", "GET"):
            out[f"{cells[0].lower()}_GBps"] = float(cells[1]) * size / 1e9
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1,4,32", help="Chunk sizes in MiB.")
    ap.add_argument("--threads", default="1,4")
    ap.add_argument("--batch", type=int, default=8, help="Chunks per put / get call.")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--piece-mib", type=int, default=4, help="Value size of the redis-py-pieces baseline.")
    ap.add_argument("--label", default="after")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import kvtier

    command = "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:])
    if os.environ.get("PYTHONPATH"):
        command = f"PYTHONPATH={os.environ['PYTHONPATH']} {command}"
    result: dict = {"command": command, "kvtier_from": os.path.dirname(kvtier.__file__),
                    "cpu_count": os.cpu_count(), "redis_py": redis.__version__, "batch": args.batch,
                    "rounds": args.rounds, "load_average_at_start": os.getloadavg(), "cases": []}
    with RedisServer() as srv:
        with srv.client() as c:
            result["redis_server"] = c.info("server")["redis_version"]
        for mib in [int(x) for x in args.sizes.split(",")]:
            for nthreads in [int(x) for x in args.threads.split(",")]:
                rows = bench_case(srv.url, mib, nthreads, args)
                rb = redis_benchmark(srv.port, mib, nthreads, max(16, (1 << 30) // (mib << 20)))
                result["cases"].append({"chunk_MiB": mib, "threads": nthreads, "variants": rows,
                                        "redis_benchmark": rb})
                for name, row in rows.items():
                    print(f"{mib:3d} MiB x{nthreads} {name:17s} put {row['put_GBps']:.2f} GB/s "
                          f"get {row['get_GBps']:.2f} GB/s  call p50/max put {row['put_call_p50_s']:.2f}/"
                          f"{row['put_call_max_s']:.2f} s get {row['get_call_p50_s']:.2f}/{row['get_call_max_s']:.2f} s"
                          f"  >2s {row['calls_over_2s']} failed {row['failed_calls']} wrong {row['wrong_bytes']}",
                          file=sys.stderr, flush=True)
                print(f"{mib:3d} MiB x{nthreads} redis-benchmark {rb}", file=sys.stderr, flush=True)
    result["load_average_at_end"] = os.getloadavg()
    print(json.dumps(result, indent=1))
    merge_json(args.out, args.label, result)


if __name__ == "__main__":
    main()
