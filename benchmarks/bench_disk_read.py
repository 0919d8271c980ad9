"""The disk tier's reads against the machine's own (issue 25.3, "a disk tier at the device's speed").

One run writes a prompt's worth of chunk files with a DiskTier, then reads the same files:

- raw: plain ``preadv`` of each file's payload (one call per file, or ``--raw-piece-mib`` pieces)
  into a preallocated page-aligned buffer, no hashing, by 1..16 threads (one file per thread
  at a time): through the page cache with the files cached, the same after dropping the
  files' pages (``POSIX_FADV_DONTNEED`` on every file before each measurement), and O_DIRECT;
- kvtier: ``DiskTier.get_into`` of all the keys into HostPool slots (the same memory as raw),
  the tier's ``read_threads`` = 1..16, cached and dropped.

It prints GB/s of payload and, per case, kvtier at ``--read-threads`` (the tier's default)
over the best raw figure of that case (dropped: the best of buffered and O_DIRECT). Goal: >= 0.8.

    # 2-core box: 32 chunks of 32 MiB (Llama-8B's layout, 256 tokens a chunk)
    .venv/bin/python benchmarks/bench_disk_read.py --json benchmarks/results/disk_read_cpu2.json --label cpu2
    # GPU host: a 32K-token prompt, 128 chunks of 32 MiB (4 GiB)
    python benchmarks/bench_disk_read.py --chunks 128 --json benchmarks/results/disk_read_h200.json --label h200
"""

from __future__ import annotations

import argparse
import mmap
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import xxhash

from _common import merge_json

from kvtier.layout import ChunkLayout
from kvtier.memory import HostPool
from kvtier.tiers.disk import DATA_OFFSET, DiskTier

GB = 1e9
CASES = ("raw_cached", "kvtier_cached", "raw_dropped", "raw_direct", "kvtier_dropped")


def layout_of(chunk_mib: int) -> ChunkLayout:
    """Llama-8B's chunk of 256 tokens (32 layers, 8 KV heads of 128, fp16) is 32 MiB; other sizes scale the width."""
    return ChunkLayout(32, 256, 32 * chunk_mib, torch.float16)


def mount_of(path: str) -> dict:
    """The file system holding ``path``: type, device, mount point (longest match in /proc/mounts)."""
    path = os.path.realpath(path)
    best = {"fstype": "?", "source": "?", "mountpoint": ""}
    try:
        with open("/proc/mounts") as f:
            for line in f:
                source, point, fstype = line.split()[:3]
                inside = path == point or path.startswith(point.rstrip("/") + "/")
                if inside and len(point) >= len(best["mountpoint"]):
                    best = {"fstype": fstype, "source": source, "mountpoint": point}
    except OSError:
        pass
    return best


def default_dir() -> str:
    """A directory on a real disk: the first of /var/tmp, the current one and /tmp not in memory."""
    for d in ("/var/tmp", os.getcwd(), tempfile.gettempdir()):
        if os.access(d, os.W_OK) and mount_of(d)["fstype"] not in ("tmpfs", "ramfs"):
            return d
    return tempfile.gettempdir()


def read_ahead_kb(source: str) -> int | None:
    dev = os.path.basename(source)
    for name in (dev, dev.rstrip("0123456789").removesuffix("p")):
        try:
            return int(Path(f"/sys/block/{name}/queue/read_ahead_kb").read_text())
        except (OSError, ValueError):
            continue
    return None


def aligned_pool(slot_bytes: int, n: int) -> HostPool:
    """``n`` page-aligned host slots (an anonymous mapping; pinned where CUDA is), touched once."""
    buf = torch.frombuffer(mmap.mmap(-1, slot_bytes * n), dtype=torch.uint8)
    buf.fill_(0)  # fault the pages in before anything is timed
    return HostPool(slot_bytes, n, pin=torch.cuda.is_available(), buffer=buf)


def write_chunks(root: str, layout: ChunkLayout, n: int) -> tuple[list[bytes], list[str]]:
    """``n`` chunk files (one random payload, the chunk's number in its first bytes); keys and paths."""
    tier = DiskTier(root, 2 * n * (DATA_OFFSET + layout.nbytes), layout, label="bench")
    payload = np.random.default_rng(0).integers(0, 256, layout.nbytes, dtype=np.uint8)
    keys = [i.to_bytes(16, "little") for i in range(n)]
    for i, k in enumerate(keys):
        payload[:8] = np.frombuffer(i.to_bytes(8, "little"), np.uint8)
        assert tier.put([k], [payload]) == [True]
    paths = [tier._path(k) for k in keys]
    tier.close()
    for p in paths:  # on disk, so that dropping the pages really drops them (dirty pages stay)
        fd = os.open(p, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    return keys, paths


def drop(paths: list[str]) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


def raw_read(path: str, dest: memoryview, direct: bool, piece: int) -> None:
    """The payload of ``path`` into ``dest``: plain preadv, nothing checked."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
    try:
        pos, n = 0, len(dest)
        while pos < n:
            k = os.preadv(fd, [dest[pos:pos + piece]], DATA_OFFSET + pos)
            if k <= 0:
                raise OSError(f"{path}: short read at {pos}")
            pos += k
    finally:
        os.close(fd)


def run(args: argparse.Namespace, root: str) -> dict:
    layout = layout_of(args.chunk_mib)
    t = time.perf_counter()
    keys, paths = write_chunks(root, layout, args.chunks)
    print(f"wrote {args.chunks} chunks of {layout.nbytes >> 20} MiB in {time.perf_counter() - t:.1f} s "
          f"under {root}", flush=True)
    pool = aligned_pool(layout.nbytes, args.chunks)
    dests = [pool.view(pool.alloc()).numpy() for _ in keys]
    views = [memoryview(d) for d in dests]
    total = args.chunks * layout.nbytes
    piece = (args.raw_piece_mib << 20) or layout.nbytes
    figures: dict[str, dict[int, list[float]]] = {c: {} for c in CASES}
    direct_reads: dict[int, float] = {}
    print(f"{'threads':>7} " + " ".join(f"{c:>14}" for c in CASES) + "   (GB/s, median)", flush=True)
    for threads in args.threads:
        tier = DiskTier(root, 2 * args.chunks * (DATA_OFFSET + layout.nbytes), layout, label="bench",
                        read_threads=threads)
        with ThreadPoolExecutor(threads) as ex:
            def raw(direct: bool) -> None:
                list(ex.map(lambda i: raw_read(paths[i], views[i], direct, piece), range(len(paths))))

            def get() -> None:
                ok = tier.get_into(keys, dests)
                assert all(ok), f"{ok.count(False)} misses"

            cases = {"raw_cached": lambda: raw(False), "kvtier_cached": get,
                     "raw_dropped": lambda: raw(False), "raw_direct": lambda: raw(True), "kvtier_dropped": get}
            times = one_thread_count(cases, paths, views, layout.nbytes, args.reps)
        stamps = [int.from_bytes(bytes(d[:8]), "little") for d in dests]
        assert stamps == list(range(args.chunks)), "a slot holds another chunk"
        s = tier.stats()
        assert s.corrupt == 0 and s.errors == 0
        direct_reads[threads] = s.extra["direct_reads"] / args.reps  # per get_into: dropped ones only
        tier.close()
        for c in CASES:
            figures[c][threads] = times[c]
        gbps = {c: total / statistics.median(times[c]) / GB for c in CASES}
        print(f"{threads:>7} " + " ".join(f"{gbps[c]:>14.2f}" for c in CASES)
              + f"   ({direct_reads[threads]:.0f} of {args.chunks} chunks read with O_DIRECT when dropped)",
              flush=True)
    return summarize(args, layout, total, figures, direct_reads)


def one_thread_count(cases: dict[str, Callable[[], None]], paths: list[str], views: list[memoryview],
                     chunk_bytes: int, reps: int) -> dict[str, list[float]]:
    """Seconds of each case, ``reps`` times; the cases take turns within each rep, so that what else
    runs on the machine meanwhile weighs on raw and kvtier alike."""
    times: dict[str, list[float]] = {c: [] for c in cases}
    for rep in range(reps):
        for p, v in zip(paths, views):  # every file wholly in the page cache
            raw_read(p, v, False, chunk_bytes)
        cached = ["raw_cached", "kvtier_cached"]
        for c in cached if rep % 2 == 0 else cached[::-1]:
            times[c].append(timed(cases[c]))
        for c in ("raw_dropped", "raw_direct", "kvtier_dropped"):
            drop(paths)
            times[c].append(timed(cases[c]))
    return times


def timed(fn: Callable[[], None]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def summarize(args: argparse.Namespace, layout: ChunkLayout, total: int, figures: dict, direct_reads: dict) -> dict:
    gbps = {c: {t: total / statistics.median(v) / GB for t, v in per.items()} for c, per in figures.items()}
    ours = args.read_threads if args.read_threads in args.threads else max(args.threads)
    best_raw_cached = max(gbps["raw_cached"].values())
    best_raw_dropped = max(max(gbps["raw_dropped"].values()), max(gbps["raw_direct"].values()))
    ratios = {
        "cached": gbps["kvtier_cached"][ours] / best_raw_cached,
        "dropped": gbps["kvtier_dropped"][ours] / best_raw_dropped,
        "cached_best_threads": max(gbps["kvtier_cached"].values()) / best_raw_cached,
        "dropped_best_threads": max(gbps["kvtier_dropped"].values()) / best_raw_dropped,
    }
    print(f"kvtier ({ours} read threads) / best raw: cached {ratios['cached']:.2f} "
          f"({gbps['kvtier_cached'][ours]:.2f} of {best_raw_cached:.2f} GB/s), dropped {ratios['dropped']:.2f} "
          f"({gbps['kvtier_dropped'][ours]:.2f} of {best_raw_dropped:.2f} GB/s); goal >= 0.8", flush=True)
    print(f"kvtier at its best thread count / best raw: cached {ratios['cached_best_threads']:.2f}, "
          f"dropped {ratios['dropped_best_threads']:.2f}", flush=True)
    return {"chunks": args.chunks, "chunk_bytes": layout.nbytes, "total_bytes": total, "read_threads": ours,
            "raw_piece_bytes": (args.raw_piece_mib << 20) or layout.nbytes, "reps": args.reps,
            "gbps_median": gbps, "seconds": figures, "direct_reads_per_get_dropped": direct_reads,
            "ratio_kvtier_over_best_raw": ratios, "goal_ratio": 0.8}


def host_facts(root: str) -> dict:
    m = mount_of(root)
    return {"cores": os.cpu_count(), "kernel": platform.release(), "dir": root, "filesystem": m["fstype"],
            "device": m["source"], "mountpoint": m["mountpoint"], "read_ahead_kb": read_ahead_kb(m["source"]),
            "mem_total_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "cuda": torch.cuda.is_available(), "python": platform.python_version(), "xxhash": xxhash.VERSION,
            "torch": torch.__version__}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default=None, help="where the chunk files go (a temporary directory under it); "
                                                "default: /var/tmp, the current directory or /tmp, not tmpfs")
    ap.add_argument("--chunks", type=int, default=32, help="chunk files (a 32K-token prompt: 128)")
    ap.add_argument("--chunk-mib", type=int, default=32, help="MiB a chunk (Llama-8B, 256 tokens: 32)")
    ap.add_argument("--threads", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4, 8, 16])
    ap.add_argument("--read-threads", type=int, default=8, help="the tier's setting the ratio is taken at")
    ap.add_argument("--raw-piece-mib", type=int, default=0, help="raw preadv size (0: a file's payload at once)")
    ap.add_argument("--reps", type=int, default=5, help="timed reads of every case, taking turns (the median counts)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--label", default="run")
    args = ap.parse_args()
    parent = args.dir or default_dir()
    need = args.chunks * (DATA_OFFSET + (args.chunk_mib << 20))
    free = shutil.disk_usage(parent).free
    if free < need + (1 << 30):
        print(f"{parent}: {free / 2**30:.1f} GiB free, the files need {need / 2**30:.1f} GiB (+1 GiB spare); "
              f"use --dir or fewer --chunks", file=sys.stderr)
        return 2
    root = tempfile.mkdtemp(prefix="kvtier-disk-read-", dir=parent)
    facts = host_facts(root)
    print(f"{facts['cores']} cores, {facts['filesystem']} on {facts['device']} (read_ahead_kb "
          f"{facts['read_ahead_kb']}), {free / 2**30:.0f} GiB free", flush=True)
    if facts["filesystem"] in ("tmpfs", "ramfs"):
        print("warning: the directory is in memory: 'dropped' measures nothing of a disk", file=sys.stderr)
    try:
        result = run(args, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    merge_json(args.json, args.label, {"command": "python " + " ".join(sys.argv), "host": facts, **result})
    return 0


if __name__ == "__main__":
    sys.exit(main())
