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

``--writer``: the store's ``writer`` setting; "process" writes from a child process (its own
GIL), "threads" from threads of this one. ``--switch-interval`` sets ``sys.setswitchinterval``.
"""

from __future__ import annotations

import argparse
import json
import statistics
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
                    help="the store's writer setting: threads of this process, or a child process")
    ap.add_argument("--switch-interval", type=float, default=None, help="sys.setswitchinterval, seconds")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.switch_interval:
        sys.setswitchinterval(args.switch_interval)
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
                       write_threads=args.write_threads, writer=args.writer)
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
        keys = [f"wb-{next(fresh)}".encode().ljust(16, b"\0") for _ in range(args.chunks)]
        for k in keys:
            store.commit(k, store.allocate())
        return keys

    def flush() -> int:
        """Wait for the writes behind; how many chunks were still queued when called."""
        left = store.pending_writes()
        store.flush()
        return left

    store.commit(b"warm".ljust(16, b"\0"), store.allocate())
    store.flush()  # the writers (a writer process: started) are up

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
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
