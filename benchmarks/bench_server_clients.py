"""`kvtier serve` with 1, 2, 4, 8 client processes at torch's default thread count, in one run.

1. load throughput: every client loops get + copy out of the shared slots + release for
   ``--duration`` seconds; the GB/s of all clients together, and the ratio against a raw
   single-process memcpy (one thread, numpy) of the same bytes measured in the same run.
   ``--dest flat``: each chunk copied into a private host buffer (``--copy kvtier``:
   ``kvtier.hostcopy.copy_bytes``; ``--copy torch``: ``dst.copy_(ref.data)``, what callers did
   before). ``--dest paged``: scattered into a CPU paged KV cache with
   ``kvtier.transfer.scatter`` (the connector's load path on a CPU engine).
   Also one process alone (no server): gather / scatter of 2048 Llama-8B tokens, host chunks
   <-> a CPU paged cache (flash layout), against its memcpy.
2. lookups: back-to-back lookups of 32 keys (and pings, which skip the store) per client;
   lookups/s, p50/p99, and the CPU time the server and the clients spend per request (from
   /proc), to tell what bounds the rate.

    python benchmarks/bench_server_clients.py --out benchmarks/results/server_clients_cpu2.json

Clients never call torch.set_num_threads: they run with whatever torch picks (one thread
per core). Run it on the tree before a change (``PYTHONPATH=old-tree``, ``--copy torch``)
and after, with ``--label before`` / ``--label after`` into the same ``--out``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

from _common import merge_json, pct, start_server

from kvtier.config import KVTierConfig
from kvtier.layout import ChunkLayout

LAYERS, TOKENS, HEADS, HEAD_SIZE, BLOCK = 4, 256, 8, 128, 16  # 4 MiB bf16 chunks
LAYOUT = ChunkLayout(LAYERS, TOKENS, HEADS * HEAD_SIZE, torch.bfloat16)


def key(i: int) -> bytes:
    return i.to_bytes(16, "little")


def payload(i: int) -> np.ndarray:
    return np.random.default_rng(i).integers(0, 256, LAYOUT.nbytes, dtype=np.uint8)


def cpu_seconds(pid: int) -> float:
    """utime + stime of process ``pid`` and its threads, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------- client processes
def _copier(dest: str, copy: str, n: int):
    """A function that copies a list of refs' bytes out, and a check of the last copy."""
    if dest == "paged":
        from kvtier.transfer import PagedKV, scatter

        nb = 2 * n * TOKENS // BLOCK
        layers = [torch.zeros(nb, HEADS, BLOCK, 2 * HEAD_SIZE, dtype=torch.bfloat16) for _ in range(LAYERS)]
        paged = PagedKV(layers, "cpu", BLOCK)
        blocks = torch.from_numpy(np.random.default_rng(os.getpid()).permutation(nb)[:n * TOKENS // BLOCK])
        mapping = (blocks.view(-1, 1) * BLOCK + torch.arange(BLOCK)).reshape(-1)
        return (lambda refs: scatter(paged, mapping, [r.data for r in refs])), None
    dst = torch.from_numpy(np.ones((n, LAYOUT.nbytes), dtype=np.uint8))  # touched: no page faults in the loop
    if copy == "torch":
        def run(refs):
            for i, r in enumerate(refs):
                dst[i].copy_(r.data)
    else:
        from kvtier.hostcopy import copy_bytes

        def run(refs):
            for i, r in enumerate(refs):
                copy_bytes(dst[i], r.data)
    return run, dst


def _client(addr: str, mode: str, dest: str, copy: str, n: int, conn) -> None:
    from kvtier.server.client import RemoteStore

    store = RemoteStore(KVTierConfig(server=addr, op_timeout_s=30), LAYOUT, "bench", pin=False)
    keys = [key(i) for i in range(n)]
    run, dst = _copier(dest, copy, n) if mode == "load" else (None, None)
    conn.send(("ready", torch.get_num_threads()))
    while (cmd := conn.recv()) is not None:
        start_at, duration = cmd
        while time.time() < start_at:
            time.sleep(0.0005)
        done, lat = 0, []
        cpu0, end = time.process_time(), time.time() + duration
        while time.time() < end:
            t0 = time.perf_counter()
            if mode == "load":
                refs = store.get(keys)
                run(refs)
                for r in refs:
                    r.release()
            elif mode == "lookup":
                store.lookup(keys)
            else:
                store.ping()
            lat.append(time.perf_counter() - t0)
            done += 1
        ok = dst is None or all(np.array_equal(dst[i].numpy(), payload(i)) for i in range(n))
        conn.send((done, lat, time.process_time() - cpu0, ok))
    store.close()


def run_level(addr: str, server_pid: int, mode: str, dest: str, k: int, args) -> dict:
    ctx = mp.get_context("spawn")
    pipes, procs = [], []
    n = args.chunks if mode == "load" else args.lookup_keys
    for _ in range(k):
        a, b = ctx.Pipe()
        p = ctx.Process(target=_client, args=(addr, mode, dest, args.copy, n, b), daemon=True)
        p.start()
        pipes.append(a)
        procs.append(p)
    threads = [a.recv()[1] for a in pipes]
    start_at = time.time() + 0.3
    for a in pipes:
        a.send((start_at, args.duration))
    time.sleep(max(0.0, start_at - time.time()))
    srv0 = cpu_seconds(server_pid)
    replies = [a.recv() for a in pipes]
    srv_cpu = cpu_seconds(server_pid) - srv0
    for a in pipes:
        a.send(None)
    for p in procs:
        p.join(30)
    ops = sum(r[0] for r in replies)
    lat = [x for r in replies for x in r[1]]
    row = {"clients": k, "torch_threads_per_client": threads[0], "ops": ops, "ops_per_s": ops / args.duration,
           "p50_us": pct(lat, 50) * 1e6, "p99_us": pct(lat, 99) * 1e6,
           "server_cpu_pct": 100 * srv_cpu / args.duration,
           "clients_cpu_pct": 100 * sum(r[2] for r in replies) / args.duration,
           "server_cpu_us_per_op": 1e6 * srv_cpu / max(ops, 1),
           "clients_cpu_us_per_op": 1e6 * sum(r[2] for r in replies) / max(ops, 1)}
    if mode == "load":
        row["GBps"] = ops * n * LAYOUT.nbytes / args.duration / 1e9
        row["bytes_ok"] = all(r[3] for r in replies)
    return row


def memcpy_GBps(n: int, seconds: float = 1.0) -> float:
    """One process, one thread: numpy copies of ``n`` chunks between two buffers."""
    src = np.ones(n * LAYOUT.nbytes, dtype=np.uint8)
    dst = np.ones_like(src)
    times = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        t0 = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - t0)
    return src.size / statistics.median(times) / 1e9


def handle_us(n: int = 20000) -> dict[str, float]:
    """Server.handle (decode, dispatch, store, encode; no socket) per request, in this process."""
    from kvtier.server import protocol as P
    from kvtier.server.server import Server

    if hasattr(P, "layout_to_msg"):
        layout_to_msg = P.layout_to_msg
    else:  # a tree from before it moved to the protocol module (a "before" run)
        from kvtier.server.server import layout_to_msg
    tmp = tempfile.mkdtemp(prefix="kvh-", dir="/tmp")
    srv = Server(KVTierConfig(tiers=("cpu",), cpu_bytes=64 * LAYOUT.nbytes), f"ipc://{tmp}/h.sock", LAYOUT)
    srv.start()
    try:
        sid = P.decode_reply(srv.handle(P.encode(P.Hello(label="h", layout=layout_to_msg(LAYOUT))))).client
        keys = [key(10**6 + i) for i in range(32)]
        out = {}
        for name, req in (("lookup_32_keys", P.Lookup(client=sid, rid=1, keys=keys)), ("ping", P.Ping(client=sid, rid=1))):
            data = P.encode(req)
            for _ in range(1000):
                srv.handle(data)
            t0 = time.perf_counter()
            for _ in range(n):
                srv.handle(data)
            out[name] = (time.perf_counter() - t0) / n * 1e6
        return out
    finally:
        srv.close(1)
        shutil.rmtree(tmp, ignore_errors=True)


def transfer_1proc(tokens: int = 2048, reps: int = 7) -> dict[str, float]:
    """GB/s of one process (torch's default threads) moving ``tokens`` Llama-8B tokens (32 layers,
    8 x 128 bf16, flash layout) between host chunks and a CPU paged cache, and its memcpy."""
    from kvtier.transfer import PagedKV, gather, scatter

    layers, heads, t = 32, 8, 256
    n = tokens // t
    nb = 2 * tokens // BLOCK
    cache = [torch.from_numpy(np.ones((2, nb, BLOCK, heads, HEAD_SIZE), np.int16)).view(torch.bfloat16)
             for _ in range(layers)]
    paged = PagedKV(cache, "flash", BLOCK)
    chunks = [torch.from_numpy(np.ones(paged.chunk_nbytes(t), np.uint8)) for _ in range(n)]
    blocks = torch.from_numpy(np.random.default_rng(0).permutation(nb)[:tokens // BLOCK])
    mapping = (blocks.view(-1, 1) * BLOCK + torch.arange(BLOCK)).reshape(-1)
    src = np.ones(n * paged.chunk_nbytes(t), np.uint8)
    dst = np.ones_like(src)

    def rate(f) -> float:
        f()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            f()
            times.append(time.perf_counter() - t0)
        return src.size / statistics.median(times) / 1e9

    return {"memcpy_GBps": rate(lambda: np.copyto(dst, src)), "gather_GBps": rate(lambda: gather(paged, mapping, chunks)),
            "scatter_GBps": rate(lambda: scatter(paged, mapping, chunks)), "torch_threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--levels", default="1,2,4,8", help="Client processes to try.")
    ap.add_argument("--chunks", type=int, default=8, help="Chunks (4 MiB) per load round.")
    ap.add_argument("--lookup-keys", type=int, default=32)
    ap.add_argument("--duration", type=float, default=3.0, help="Seconds per level.")
    ap.add_argument("--dest", default="flat,paged", help="Load destinations: flat, paged (comma-separated).")
    ap.add_argument("--copy", choices=("kvtier", "torch"), default="kvtier", help="How --dest flat copies.")
    ap.add_argument("--modes", default="load,lookup,ping")
    ap.add_argument("--label", default="after", help="Key of this run in --out (before / after).")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import kvtier

    levels = [int(x) for x in args.levels.split(",")]
    tmp = tempfile.mkdtemp(prefix="kvb-", dir="/tmp")
    addr = f"ipc://{tmp}/s.sock"
    proc = start_server(addr, 4 * max(args.chunks, args.lookup_keys) * LAYOUT.nbytes)
    command = "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:])
    if os.environ.get("PYTHONPATH"):
        command = f"PYTHONPATH={os.environ['PYTHONPATH']} {command}"
    result: dict = {
        "command": command,
        "kvtier_from": os.path.dirname(kvtier.__file__), "layout": LAYOUT.describe(),
        "chunk_bytes": LAYOUT.nbytes, "chunks_per_round": args.chunks, "duration_s": args.duration,
        "cpu_count": os.cpu_count(), "torch": torch.__version__, "numpy": np.__version__,
        "load_average_at_start": os.getloadavg(), "copy": args.copy,
    }
    try:
        from kvtier.server.client import RemoteStore

        with RemoteStore(KVTierConfig(server=addr, op_timeout_s=30), LAYOUT, "bench", pin=False) as s:
            for i in range(max(args.chunks, args.lookup_keys)):
                assert s.put(key(i), payload(i))
        result["memcpy_1proc_GBps"] = base = memcpy_GBps(args.chunks)
        result["server_handle_us"] = handle_us()
        result["transfer_1proc_2048_tokens"] = transfer_1proc()
        print(f"one process, 2048 tokens: {result['transfer_1proc_2048_tokens']}", file=sys.stderr)
        print(f"raw memcpy, one process: {base:.2f} GB/s", file=sys.stderr)
        for mode in args.modes.split(","):
            for dest in (args.dest.split(",") if mode == "load" else [""]):
                name = f"load_{dest}" if mode == "load" else mode
                rows = []
                for k in levels:
                    row = run_level(addr, proc.pid, mode, dest, k, args)
                    if mode == "load":
                        row["ratio_to_memcpy"] = row["GBps"] / base
                    rows.append(row)
                    print(f"{name:10s} {k} clients: " + ", ".join(
                        f"{c} {v:.3g}" if isinstance(v, float) else f"{c} {v}" for c, v in row.items()
                        if c != "clients"), file=sys.stderr)
                result[name] = rows
    finally:
        proc.terminate()
        proc.wait(30)
        shutil.rmtree(tmp, ignore_errors=True)
    result["load_average_at_end"] = os.getloadavg()
    print(json.dumps(result, indent=1))
    merge_json(args.out, args.label, result)


if __name__ == "__main__":
    main()
