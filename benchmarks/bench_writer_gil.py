"""Does the disk tier's write-behind slow the engine's thread? (issue 11: the cold and hit gaps)

In a vLLM engine process kvtier's writer threads (disk tier) share the GIL with the engine's
thread. This times, on that thread, with the disk tier idle and while it writes chunks
behind (``--chunks`` fresh chunks committed just before):

* ``launch_ms``: enqueueing ``--ops`` small CUDA ops (the host side of a forward: Python and
  torch calls, each releasing and retaking the GIL);
* ``plan_loads_ms``: planning the load of ``--tokens`` tokens from the cpu tier (what a hit's
  step does on the engine thread), and ``plan_saves_ms``: planning their save.

Llama-3.1-8B geometry (32 layers, 8 KV heads x 128, bf16, block 16, chunk 256: 32 MiB chunks).
Ratios are printed against the idle figures measured in the same run.

    python3 benchmarks/bench_writer_gil.py --out benchmarks/results/writer_gil_h200.json
    python3 benchmarks/bench_writer_gil.py --cpu [--small]   # the cache on CPU [small chunks: a dry run]

``--writer process`` writes the same chunks from another process (its own store on its own
directory): what is left then is not the GIL but the machine (cores, memory bandwidth, the
kernel's page cache). ``--switch-interval`` sets ``sys.setswitchinterval`` (default 5 ms).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import xxhash

from kvtier.config import KVTierConfig
from kvtier.layout import ChunkLayout
from kvtier.store import Store
from kvtier.transfer import PagedKV
from kvtier.vllm.scheduler import LoadSpec, SaveSpec
from kvtier.vllm.worker import KVWorker

BS, C = 16, 256


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--ops", type=int, default=3000)
    ap.add_argument("--chunks", type=int, default=64, help="chunks written behind in the 'writing' runs")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--write-threads", type=int, default=2)
    ap.add_argument("--cpu", action="store_true", help="the cache on CPU (no GPU needed)")
    ap.add_argument("--small", action="store_true", help="a small geometry (512 KiB chunks): a quick dry run")
    ap.add_argument("--writer", choices=("threads", "process"), default="threads",
                    help="who writes behind: this process's writer threads, or another process")
    ap.add_argument("--switch-interval", type=float, default=None, help="sys.setswitchinterval, seconds")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.switch_interval:
        sys.setswitchinterval(args.switch_interval)
    if args.child:
        return write_on_request(args)
    L, H, D = (32, 8, 128) if not args.small else (4, 2, 64)
    dev = torch.device("cpu" if args.cpu else "cuda")
    n = args.tokens
    nb = 2 * n // BS + 64
    caches = {f"model.layers.{i}.self_attn.attn": torch.zeros(2, nb, BS, H, D, dtype=torch.bfloat16, device=dev)
              for i in range(L)}
    paged = PagedKV.from_vllm(caches, block_size=BS)
    layout = ChunkLayout(L, C, H * D, torch.bfloat16)
    disk = tempfile.mkdtemp(prefix="kvtier-writer-gil-")
    per = n // C
    cfg = KVTierConfig(chunk_size=C, tiers=("cpu", "disk"), cpu_bytes=(4 * per + 2 * args.chunks + 8) * layout.nbytes,
                       disk_path=disk, disk_bytes=(4 * args.chunks + 8) * layout.nbytes,
                       write_threads=args.write_threads)
    store = Store(cfg, layout)
    w = KVWorker(store, paged, C)
    w.warm_up()
    keys = [f"hit-{i}".encode().ljust(16, b"\0") for i in range(per)]
    for k in keys:
        store.put(k, torch.randint(0, 255, (layout.nbytes,), dtype=torch.uint8))
    store.flush()
    block_ids = list(range(nb))[: n // BS]
    save_ids = list(range(nb))[n // BS: 2 * n // BS]
    x = torch.zeros(16, device=dev)
    fresh = iter(range(1 << 30))

    def launch() -> float:
        t = time.perf_counter()
        for _ in range(args.ops):
            x.add_(1)
        return time.perf_counter() - t

    def plan_loads() -> float:
        t = time.perf_counter()
        _, _, ld = w._plan_loads([LoadSpec("r", 0, n, 0, keys, block_ids)])
        dt = time.perf_counter() - t
        for ref in ld.refs:
            ref.release()
        return dt

    def plan_saves() -> float:
        t = time.perf_counter()
        w.start_save([SaveSpec("s", list(range(per)), [b"x" * 16] * per, save_ids)])
        dt = time.perf_counter() - t
        w._drop_saves()
        return dt

    def write_behind() -> list[bytes]:
        """Commit ``--chunks`` new chunks: the writer threads write them to disk from now on."""
        if child is not None:  # the other process writes them
            child.stdin.write("go\n")
            child.stdin.flush()
            return []
        keys = [f"wb-{next(fresh)}".encode().ljust(16, b"\0") for _ in range(args.chunks)]
        for k in keys:
            store.commit(k, store.allocate())
        return keys

    def flush() -> int:
        """Wait for the writes behind; how many chunks were still queued when called."""
        if child is None:
            left = store._queue.qsize()
            store.flush()
            return left
        return int(child.stdout.readline())

    child = None
    if args.writer == "process":
        argv = [a for a in sys.argv[1:] if a != "--out" and not a.endswith(".json")]
        child = subprocess.Popen([sys.executable, __file__, "--child", *argv], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True)
        assert child.stdout.readline().strip() == "ready"

    result: dict = {"command": "python3 benchmarks/bench_writer_gil.py " + " ".join(sys.argv[1:]),
                    "python": sys.version.split()[0], "xxhash": xxhash.VERSION, "device": str(dev),
                    "chunk_bytes": layout.nbytes,
                    "tokens": n, "ops": args.ops, "chunks_written": args.chunks,
                    "write_threads": args.write_threads, "writer": args.writer,
                    "switch_interval_s": sys.getswitchinterval(), "runs": {}}
    for name, fn in (("launch_ms", launch), ("plan_loads_ms", plan_loads), ("plan_saves_ms", plan_saves)):
        fn()  # warm
        idle, busy = [], []
        for _ in range(args.reps):
            if not args.cpu:
                torch.cuda.synchronize()
            idle.append(fn() * 1e3)
            written = write_behind()
            time.sleep(0.005)  # the writers are under way
            busy.append(fn() * 1e3)
            left = flush()
            store.cpu.delete(written)  # keep the cpu tier for the chunks the loads read
            if not args.cpu:
                torch.cuda.synchronize()
        result["runs"][name] = {"idle": idle, "writing": busy, "queue_left_after": left}
        result[name] = {"idle": statistics.median(idle), "writing": statistics.median(busy),
                        "ratio": statistics.median(busy) / statistics.median(idle)}
        print(f"{name:>14}: idle {result[name]['idle']:8.3f}  writing behind {result[name]['writing']:8.3f}  "
              f"({result[name]['ratio']:.2f}x; {left} chunks still queued after)", flush=True)
    store.close()
    if child is not None:
        child.stdin.close()
        child.wait(timeout=60)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


def write_on_request(args: argparse.Namespace) -> int:
    """The ``--writer process`` child: its own store (cpu + disk); per "go" on stdin, commit
    ``--chunks`` chunks (its writer threads write them to disk); answers how many were still
    queued when the parent's measurement ended (the next "go" or end of input)."""
    L, H, D = (32, 8, 128) if not args.small else (4, 2, 64)
    layout = ChunkLayout(L, C, H * D, torch.bfloat16)
    cfg = KVTierConfig(chunk_size=C, tiers=("cpu", "disk"), cpu_bytes=(2 * args.chunks + 8) * layout.nbytes,
                       disk_path=tempfile.mkdtemp(prefix="kvtier-writer-gil-child-"),
                       disk_bytes=(4 * args.chunks + 8) * layout.nbytes, write_threads=args.write_threads)
    store = Store(cfg, layout)
    print("ready", flush=True)
    fresh = iter(range(1 << 30))
    for line in sys.stdin:
        if line.strip() != "go":
            continue
        keys = [f"wb-{next(fresh)}".encode().ljust(16, b"\0") for _ in range(args.chunks)]
        for k in keys:
            store.commit(k, store.allocate())
        time.sleep(0.05)  # the parent measures meanwhile
        left = store._queue.qsize()
        store.flush()
        store.cpu.delete(keys)
        print(left, flush=True)
    store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
