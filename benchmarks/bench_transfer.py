"""Transfer kernels vs the PCIe limit (GPU).

Llama-3.1-8B KV geometry: 32 layers, 8 KV heads x 128, bf16, vLLM flash layout
per layer ``[2, NB, 16, 8, 128]``, random whole blocks, pinned host chunk
buffers of 256 tokens (slices of one pinned allocation, like kvtier's host pool).
For 256/2048/8192/32768 tokens and both directions (load = scatter H2D, save =
gather D2H) it times:

* ``copy``   — one pinned contiguous ``copy_`` of the same bytes (the limit);
* ``torch``  — index_select/index_copy_ on the GPU per layer + one pinned copy;
* ``kvtier-staged`` / ``kvtier-uva`` — kvtier.transfer's two host paths;
* ``kvtier-staged-cpumap`` — staged, with the slot mapping on the host (as the connector has it);
* ``kvtier-staged-jit`` — staged, every launch through Triton's binder (no cached direct launch);

and how much a concurrent compute stream (a loop of bf16 matmuls) is slowed
while each method runs. Prints a table with ratios vs ``copy``; writes JSON to
``--out``.

    PYTHONPATH=. python3 benchmarks/bench_transfer.py --out benchmarks/results/transfer_h100.json
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import statistics
import sys
import time

import torch

from kvtier.transfer import PagedKV, gather, scatter
from kvtier.transfer import triton_kernels as tk

L, H, D, BS, T = 32, 8, 128, 16, 256
W = H * D
DT = torch.bfloat16


def _time(fn, reps: int, warm: int = 2) -> float:
    """Median seconds of fn() (which enqueues on the current stream and side streams)."""
    cur = torch.cuda.current_stream()
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(cur)
        fn()
        b.record(cur)
        b.synchronize()
        ts.append(a.elapsed_time(b) / 1e3)
    return statistics.median(ts)


def _torch_baseline(layers, nb: int, mapping, st, hflat):
    """(save, load) of the torch baseline (flash layout): index_select / index_copy_ per layer on
    the GPU into the staging tensor ``st``, and one pinned copy of it to or from ``hflat``."""
    def save():
        for l, x in enumerate(layers):
            torch.index_select(x.view(2, nb * BS, W), 1, mapping, out=st[l])
        hflat.copy_(st.reshape(-1).view(torch.uint8), non_blocking=True)

    def load():
        st.reshape(-1).view(torch.uint8).copy_(hflat, non_blocking=True)
        for l, x in enumerate(layers):
            x.view(2, nb * BS, W).index_copy_(1, mapping, st[l])
    return save, load


def _binder(fn):
    """``fn`` with direct launches of compiled kernels off (every launch through Triton's binder)."""
    def run():
        tk._DIRECT["on"] = False
        try:
            return fn()
        finally:
            tk._DIRECT["on"] = True
    return run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokens", default="256,2048,8192,32768")
    ap.add_argument("--reps", type=int, default=0, help="0 = by size")
    ap.add_argument("--modes", default="staged,uva")
    ap.add_argument("--sweep", action="store_true", help="also sweep staging slot sizes")
    ap.add_argument("--profile", action="store_true", help="host-side cost of one 256-token call, then exit")
    ap.add_argument("--layout", default="flash", choices=["flash", "kv_split"],
                    help="flash [2, NB, 16, 8, 128] per layer, or kv_split: vLLM 0.32's GPU layout "
                         "[NB, 8, 16, 256] over memory [NB, 16, 8, 256] (LBNHC; no torch baseline)")
    args = ap.parse_args()
    sizes = [int(x) for x in args.tokens.split(",")]
    modes = args.modes.split(",")
    dev = torch.device("cuda")
    max_tok = max(sizes)
    nb = max_tok // BS + 256
    torch.manual_seed(0)
    t0 = time.time()
    flash = args.layout == "flash"
    if flash:
        layers = [torch.randn(2, nb, BS, H, D, device=dev).to(DT) for _ in range(L)]
    else:
        layers = [torch.randn(nb, BS, H, 2 * D, device=dev).to(DT).transpose(1, 2) for _ in range(L)]
    paged = PagedKV(layers, args.layout, BS)
    cb = paged.chunk_nbytes(T)
    host = torch.empty(cb * (max_tok // T), dtype=torch.uint8, pin_memory=True)
    host.fill_(1)
    dev_flat = torch.empty_like(host, device=dev)
    stage = torch.empty(L, 2, max_tok, W, dtype=DT, device=dev)
    print(f"setup {time.time() - t0:.1f}s; {torch.cuda.get_device_name()} torch {torch.__version__}", flush=True)

    results = []
    if args.profile:
        _profile(paged, host, cb, nb)
        return

    def record(**kw):
        results.append(kw)
        print(json.dumps(kw), flush=True)

    for n in sizes:
        reps = args.reps or {256: 30, 2048: 15, 8192: 6}.get(n, 3)
        nbytes = n * paged.chunk_nbytes(1)
        blocks = torch.randperm(nb)[: n // BS]
        mapping_cpu = (blocks[:, None] * BS + torch.arange(BS)).reshape(-1)
        mapping = mapping_cpu.to(dev)
        chunks = [host[i * cb:(i + 1) * cb] for i in range(n // T)]
        hflat, dflat = host[:nbytes], dev_flat[:nbytes]
        st = stage[:, :, :n]

        torch_save, torch_load = _torch_baseline(layers, nb, mapping, st, hflat)
        methods = {
            ("save", "copy"): lambda: hflat.copy_(dflat, non_blocking=True),
            ("load", "copy"): lambda: dflat.copy_(hflat, non_blocking=True),
        }
        if flash:
            methods[("save", "torch")] = torch_save
            methods[("load", "torch")] = torch_load
        for mode in modes:
            methods[("save", f"kvtier-{mode}")] = (
                lambda mode=mode: gather(paged, mapping, chunks, mode=mode).wait_on())
            methods[("load", f"kvtier-{mode}")] = (
                lambda mode=mode: scatter(paged, mapping, chunks, mode=mode).wait_on())
        # A CPU mapping (what a connector usually has) costs one small H2D: time it too.
        methods[("save", "kvtier-staged-cpumap")] = lambda: gather(paged, mapping_cpu, chunks, mode="staged").wait_on()
        methods[("load", "kvtier-staged-cpumap")] = lambda: scatter(paged, mapping_cpu, chunks, mode="staged").wait_on()
        # Launches through Triton's own binder instead of the cached compiled kernel (before/after).
        methods[("save", "kvtier-staged-jit")] = _binder(lambda: gather(paged, mapping, chunks, mode="staged").wait_on())
        methods[("load", "kvtier-staged-jit")] = _binder(lambda: scatter(paged, mapping, chunks, mode="staged").wait_on())
        base = {}
        for (direction, name), fn in methods.items():
            try:
                s = _time(fn, reps)
            except Exception as e:  # noqa: BLE001 - report and go on
                record(tokens=n, direction=direction, method=name, error=repr(e)[:300])
                continue
            if name == "copy":
                base[direction] = s
            record(tokens=n, direction=direction, method=name, ms=s * 1e3, gbps=nbytes / s / 1e9,
                   ratio_vs_copy=(base[direction] / s) if direction in base else None)
        if args.sweep and n in (256, 2048):
            for slot_mb, pieces, nslots in ((8, 4, 2), (16, 4, 2), (64, 4, 2), (32, 1, 2), (32, 2, 2), (16, 2, 2),
                                           (32, 8, 3), (64, 8, 3)):
                tk.configure(staging_bytes=slot_mb << 20, min_pieces=pieces, staging_slots=nslots)
                for direction, f in (("save", gather), ("load", scatter)):
                    s = _time(lambda f=f: f(paged, mapping, chunks, mode="staged").wait_on(), reps)
                    record(tokens=n, direction=direction, method=f"sweep-staged-{slot_mb}M-p{pieces}-s{nslots}",
                           ms=s * 1e3, gbps=nbytes / s / 1e9, ratio_vs_copy=base[direction] / s)
            tk.configure(staging_bytes=32 << 20, min_pieces=4, staging_slots=2)

    # Correctness spot check of the timed path (full tests live in tests/gpu).
    n = min(sizes)
    mapping_cpu = torch.arange(n) * 3 % (nb * BS)
    chunks = [host[i * cb:(i + 1) * cb] for i in range(n // T)]
    for mode in modes:
        host[: n * paged.chunk_nbytes(1)].zero_()
        gather(paged, mapping_cpu, chunks, mode=mode).wait()
        m = mapping_cpu.to(dev)
        if flash:
            ref = torch.stack([x.view(2, nb * BS, W)[:, m] for x in layers], 1).cpu()
        else:  # K = [..., :D], V = [..., D:] of each head (vLLM's split), token rows [n, H*D]
            rows = [x.transpose(1, 2)[m // BS, m % BS] for x in layers]  # [n, H, 2D]
            ref = torch.stack([torch.stack([r[..., :D].reshape(n, W), r[..., D:].reshape(n, W)]) for r in rows],
                              1).cpu()
        got = chunks[0].view(DT).view(2, L, T, W)
        record(check=f"gather-{mode}", ok=bool(torch.equal(got.view(torch.int16), ref.view(torch.int16))))

    # Interference: a matmul loop on a compute stream, alone and while each method moves 8192 tokens.
    n = min(8192, max_tok)
    blocks = torch.randperm(nb)[: n // BS]
    mapping = (blocks[:, None] * BS + torch.arange(BS)).reshape(-1).to(dev)
    chunks = [host[i * cb:(i + 1) * cb] for i in range(n // T)]
    nbytes = n * paged.chunk_nbytes(1)
    a = torch.randn(4096, 4096, device=dev, dtype=DT)
    b = torch.randn(4096, 4096, device=dev, dtype=DT)
    comp = torch.cuda.Stream()
    xfer = torch.cuda.Stream()  # the "engine" stream the transfer is ordered after (idle)
    st = stage[:, :, :n]
    hflat, dflat = host[:nbytes], dev_flat[:nbytes]

    def mm_loop(k=150):
        with torch.cuda.stream(comp):
            for _ in range(k):
                torch.mm(a, b)

    def timed_mm(start_transfer=None):
        torch.cuda.synchronize()
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        x0, x1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        if start_transfer is not None:
            with torch.cuda.stream(xfer):
                x0.record(xfer)
                start_transfer()
                x1.record(xfer)
        e0.record(comp)
        mm_loop()
        e1.record(comp)
        torch.cuda.synchronize()
        return e0.elapsed_time(e1), (x0.elapsed_time(x1) if start_transfer is not None else None)

    torch_save_on_xfer, torch_load_on_xfer = _torch_baseline(layers, nb, mapping, st, hflat)
    bg = {
        ("save", "copy"): lambda: hflat.copy_(dflat, non_blocking=True),
        ("load", "copy"): lambda: dflat.copy_(hflat, non_blocking=True),
    }
    if flash:
        bg[("save", "torch")] = torch_save_on_xfer
        bg[("load", "torch")] = torch_load_on_xfer
    for mode in modes:
        bg[("save", f"kvtier-{mode}")] = lambda mode=mode: gather(paged, mapping, chunks, stream=xfer, mode=mode).wait_on(xfer)
        bg[("load", f"kvtier-{mode}")] = lambda mode=mode: scatter(paged, mapping, chunks, stream=xfer, mode=mode).wait_on(xfer)
    timed_mm()
    alone = statistics.median(timed_mm()[0] for _ in range(5))
    record(interference="matmul-alone", tokens=n, mm_ms=alone)
    for (direction, name), fn in bg.items():
        runs = [timed_mm(fn) for _ in range(3)]
        mm = statistics.median(r[0] for r in runs)
        xf = statistics.median(r[1] for r in runs)
        record(interference=name, direction=direction, tokens=n, mm_ms=mm, mm_slowdown=mm / alone - 1,
               transfer_ms_concurrent=xf, transfer_gbps_concurrent=nbytes / (xf / 1e3) / 1e9)

    import triton

    out = {
        "command": " ".join(shlex.quote(x) for x in [sys.executable, *sys.argv]),
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "shape": {"layers": L, "kv_heads": H, "head_size": D, "dtype": "bfloat16", "block_size": BS,
                  "chunk_tokens": T, "layout": "flash [2, NB, 16, 8, 128] per layer" if flash else
                  "kv_split [NB, 8, 16, 256] per layer, memory [NB, 16, 8, 256] (vLLM 0.32 GPU, LBNHC)",
                  "bytes_per_token": paged.chunk_nbytes(1)},
        "kvtier_config": tk.configure(),
        "results": results,
    }
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)

    # Summary table (last in the output).
    print(f"\n{'tokens':>6} {'dir':>4} {'method':>22} {'ms':>8} {'GB/s':>6} {'vs copy':>7}")
    for r in results:
        if "method" in r and "ms" in r:
            ratio = f"{r['ratio_vs_copy']:.2f}" if r.get("ratio_vs_copy") else "-"
            print(f"{r['tokens']:>6} {r['direction']:>4} {r['method']:>22} {r['ms']:8.3f} {r['gbps']:6.1f} {ratio:>7}")
    for r in results:
        if "interference" in r and "mm_slowdown" in r:
            print(f"interference {r['interference']:>16} {r['direction']}: matmul +{100 * r['mm_slowdown']:.1f}%, "
                  f"transfer {r['transfer_gbps_concurrent']:.1f} GB/s")
        elif "check" in r:
            print(r)


def _profile(paged, host, cb, nb) -> None:
    """Where the host time of a 256-token call goes (cProfile), and its GPU timeline."""
    import cProfile
    import pstats

    dev = torch.device("cuda")
    mapping = (torch.randperm(nb)[: T // BS][:, None] * BS + torch.arange(BS)).reshape(-1).to(dev)
    chunks = [host[:cb]]
    for name, f in (("gather", gather), ("scatter", scatter)):
        for _ in range(5):
            f(paged, mapping, chunks).wait()
        for direct in (True, False):
            tk._DIRECT["on"] = direct
            hs = []
            for _ in range(50):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                tr = f(paged, mapping, chunks)
                hs.append(time.perf_counter() - t0)
                tr.wait()
            how = "direct launches" if direct else "launches through Triton's binder"
            print(f"{name}: host time of the call, median {1e6 * statistics.median(hs):.0f} us ({how})", flush=True)
        tk._DIRECT["on"] = True
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(50):
            f(paged, mapping, chunks).wait()
        pr.disable()
        pstats.Stats(pr).sort_stats("tottime").print_stats(14)
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            torch.cuda.synchronize()
            f(paged, mapping, chunks).wait()
        evs = [e for e in prof.events() if e.device_type.name == "CUDA" or "cuda" in e.name.lower()
               or "Memcpy" in e.name or "kv_copy" in e.name]
        t0 = min(e.time_range.start for e in prof.events())
        for e in sorted(evs, key=lambda e: e.time_range.start)[:40]:
            print(f"  {e.time_range.start - t0:9.1f} us  dur {e.time_range.elapsed_us():8.1f}  "
                  f"{e.device_type.name:5} {e.name[:70]}")


if __name__ == "__main__":
    main()
