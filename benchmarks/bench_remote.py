"""Remote tiers at network speed (issue 26.4): read and write GB/s of 32 MiB chunks through the
mooncake tier and the redis tier with 1, 2, 4, 8 concurrent clients, beside a raw TCP transfer
of the same bytes over the same loopback, in one run.

Each client is a process of its own (as engine processes are), with its own tier objects and its
own registered host buffer of ``--chunks`` chunks. All clients start each phase together (a
barrier); GB/s = the bytes of all clients over the phase's wall time (first start to last end):

* ``write``: each client puts its chunks one call per chunk (the write-behind's pattern);
* ``read``: each client gets its chunks in one call (a load's pattern), checked (checksum);
* ``mooncake-raw``: Mooncake's own ``batch_put_from`` / ``batch_get_into`` of the same
  registered bytes (no header, checksum, or replacing put): what the tier adds is the gap to it;
* ``tcp``: each client sends (write) / receives (read) the same bytes over its own TCP
  connection to one server process (a thread per connection, ``recv_into`` / ``sendall``).

Servers, all on 127.0.0.1 and started here: ``mooncake_master`` and a ``mooncake_client``
holding a segment (so chunks cross loopback to another process, as to another host: the
clients add no memory of their own; ``--segments N``: N holders), and one ``redis-server``. Phases take
turns within each round, a round per ``--rounds`` after one uncounted warm-up round (the
segment's pages are touched for the first time there); the median round is reported.

    python benchmarks/bench_remote.py --out benchmarks/results/remote_tiers_cpu2.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import socket
import statistics
import sys
import threading
import time

import numpy as np

from _common import start_workers, stop_workers

MIB = 1 << 20


def layout_32mib():
    import torch

    from kvtier.layout import ChunkLayout

    return ChunkLayout(32, 256, 1024, torch.bfloat16)  # Llama-8B's 256-token chunk: [2, 32, 256, 1024] bf16


# ---------------------------------------------------------------------------------- raw TCP
def tcp_server(sock: socket.socket, nbytes: int) -> None:
    """For each connection: a thread that receives (op 'w') or sends (op 'r') ``n`` bytes per request."""
    def serve(conn: socket.socket) -> None:
        buf = bytearray(nbytes)
        mv = memoryview(buf)
        with conn:
            while (op := conn.recv(1)):
                n = int.from_bytes(conn.recv(8), "little")
                if op == b"w":
                    got = 0
                    while got < n:
                        got += conn.recv_into(mv[got % nbytes:], min(n - got, nbytes - got % nbytes))
                    conn.sendall(b"k")
                else:
                    sent = 0
                    while sent < n:
                        k = min(n - sent, nbytes)
                        conn.sendall(mv[:k])
                        sent += k

    while True:
        conn, _ = sock.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


def tcp_op(conn: socket.socket, op: str, buf: memoryview, total: int) -> None:
    conn.sendall(op.encode() + total.to_bytes(8, "little"))
    if op == "w":
        sent = 0
        while sent < total:
            k = min(total - sent, len(buf))
            conn.sendall(buf[:k])
            sent += k
        assert conn.recv(1) == b"k"
    else:
        got = 0
        while got < total:
            got += conn.recv_into(buf[got % len(buf):], min(total - got, len(buf) - got % len(buf)))


# ---------------------------------------------------------------------------------- client
def client(idx: int, cfg: dict, barrier, pipe) -> None:
    from kvtier.tiers.mooncake import MooncakeTier
    from kvtier.tiers.redis import RedisTier

    layout = layout_32mib()
    n, size = cfg["chunks"], layout.nbytes
    host = np.random.default_rng(idx).integers(0, 256, n * size, dtype=np.uint8)
    dest = np.ones(n * size, dtype=np.uint8)  # touched: no page faults inside a timed phase
    slots = [host[i * size:(i + 1) * size] for i in range(n)]
    outs = [dest[i * size:(i + 1) * size] for i in range(n)]
    mc = MooncakeTier(cfg["master"], layout, label="bench", metadata_server=cfg["metadata"], segment_bytes=0,
                      buffer_bytes=16 * MIB, wait_s=30)
    assert mc.wait_connected(30), "mooncake tier did not connect"
    mc.register_memory(host)
    mc.register_memory(dest)
    rd = RedisTier([cfg["redis"]], layout, label="bench", op_timeout_s=10)
    tcp = socket.create_connection(cfg["tcp"])
    tcp.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    tiers = {"mooncake": mc, "redis": rd}
    pipe.send("ready")
    while (cmd := pipe.recv()) is not None:
        system, op, rnd = cmd
        keys = [f"{idx}-{rnd}-{i}".encode().ljust(16, b".")[:16] for i in range(n)]
        barrier.wait()
        t0 = time.monotonic()
        ok = n
        if system == "tcp":
            tcp_op(tcp, op[0], memoryview(host if op == "write" else dest), n * size)
        elif system == "mooncake-raw":
            names = ["raw" + k.hex() for k in keys]
            if op == "write":
                ok = sum(mc._store.batch_put_from([m], [s.ctypes.data], [size])[0] == 0 for m, s in zip(names, slots))
            else:
                ok = sum(c == size for c in mc._store.batch_get_into(names, [o.ctypes.data for o in outs], [size] * n))
        elif op == "write":
            ok = sum(tiers[system].put([k], [s])[0] for k, s in zip(keys, slots))
        else:
            ok = sum(tiers[system].get_into(keys, outs))
        t1 = time.monotonic()
        if system != "tcp" and op == "read":
            assert all(np.array_equal(o, s) for o, s in zip(outs, slots)), "read other bytes than written"
            if system == "mooncake-raw":
                mc._store.batch_remove(names, True)
            else:
                tiers[system].delete(keys)
        pipe.send((t0, t1, ok))
    mc.close()
    rd.close()


def run(clients: int, cfg: dict, rounds: int, systems: list[str] | None = None) -> dict:
    barrier = mp.get_context("spawn").Barrier(clients)
    pipes, procs = start_workers(client, [(i, cfg, barrier) for i in range(clients)])
    size = layout_32mib().nbytes
    results: dict[str, list[float]] = {}
    systems = systems or ["tcp", "mooncake", "mooncake-raw", "redis"]
    for rnd in range(-1, rounds):  # round -1 warms up (first touches of the segment's pages), not counted
        first = systems[rnd % len(systems):] + systems[:rnd % len(systems)]  # each round starts with another system
        for system, op in [(s, op) for s in first for op in ("write", "read")]:  # a read after its write
            for a in pipes:
                a.send((system, op, rnd))
            got = [a.recv() for a in pipes]
            wall = max(t1 for _, t1, _ in got) - min(t0 for t0, _, _ in got)
            moved = sum(ok for _, _, ok in got) * size
            if rnd < 0:
                continue
            if moved < clients * cfg["chunks"] * size:
                print(f"  {system} {op}: only {moved // size} of {clients * cfg['chunks']} chunks moved",
                      file=sys.stderr)
            results.setdefault(f"{system}_{op}_gbps", []).append(moved / wall / 1e9)
    stop_workers(pipes, procs, 30)
    row = {"clients": clients, "chunk_mib": size // MIB, "chunks_per_client": cfg["chunks"]}
    row.update({k: round(statistics.median(v), 3) for k, v in results.items()})
    row["rounds"] = {k: [round(x, 3) for x in v] for k, v in results.items()}
    for op in ("write", "read"):
        for system in [s for s in systems if s != "tcp"]:
            row[f"{system}_{op}_vs_tcp"] = round(row[f"{system}_{op}_gbps"] / row[f"tcp_{op}_gbps"], 2)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", default="1,2,4,8")
    ap.add_argument("--chunks", type=int, default=4, help="32 MiB chunks per client per phase")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--systems", default="tcp,mooncake,mooncake-raw,redis", help="what to measure (tcp first)")
    ap.add_argument("--segments", type=int, default=1, help="mooncake_client processes holding the pool "
                    "(each serves its transfers on one I/O thread)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from kvtier.local_mooncake import MooncakeMaster, MooncakeSegment
    from kvtier.local_redis import RedisServer

    counts = [int(c) for c in args.clients.split(",")]
    seg = 2 * max(counts) * args.chunks * 32 * MIB  # a round's chunks at most half of it (eviction at 90 %)
    with (MooncakeMaster() as master, RedisServer() as redis_srv,
          contextlib.ExitStack() as holders):
        for _ in range(args.segments):
            holders.enter_context(MooncakeSegment(master, seg // args.segments))
        srv = socket.socket()
        srv.bind(("127.0.0.1", 0))
        srv.listen(64)
        ctx = mp.get_context("spawn")
        tcp = ctx.Process(target=tcp_server, args=(srv, 32 * MIB), daemon=True)
        tcp.start()
        cfg = {"master": master.address, "metadata": master.metadata_url, "redis": redis_srv.url,
               "tcp": srv.getsockname(), "chunks": args.chunks}
        rows = []
        for c in counts:
            row = run(c, cfg, args.rounds, args.systems.split(","))
            rows.append(row)
            print(f"{c} clients: " + "  ".join(f"{k}={v}" for k, v in row.items()
                                              if k.endswith(("gbps", "vs_tcp"))), flush=True)
        tcp.kill()
    doc = {
        "command": " ".join([f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("MC_")]
                            + ["python"] + sys.argv),
        "host": {"cpus": os.cpu_count(), "uname": " ".join(os.uname())},
        "what": "GB/s of 32 MiB chunks, all clients together; write = put one chunk per call, read = get all "
                "of a client's chunks in one call (checked); tcp = the same bytes over one loopback TCP "
                "connection per client; mooncake-raw = Mooncake's batch_put_from / batch_get_into of the same "
                "registered bytes without kvtier; *_vs_tcp = system / tcp; median of the rounds",
        "rows": rows,
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(doc, f, indent=1)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
