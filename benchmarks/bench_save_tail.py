"""What a step's save costs the end of that step (GPU; issue 28's "cold TTFT with saving").

On an H100 (2026-12-06 12:10 UTC, `gpu_cold_causes_h100_56e09b3.json`) saving added 1.3 / 3.2 / 8.2 ms
to the TTFT of 2K / 8K / 32K-token cold prompts, while the engine thread was ~150 ms ahead of the GPU
when it enqueued the save: the host time of the save cannot be what the request waited for. What
runs on the GPU after the save is enqueued, at the last layer's attention hook, is the forward's
tail (the last layer's MLP, the sampler) and vLLM's small device->host copy of the sampled tokens.
The save's gather kernels compete with the tail for the SMs, and its DMAs, device->host like the
token copy, for the copy engines.

This times that end of a step, with Llama-3.1-8B's KV geometry (32 layers, 8 KV heads x 128, bf16,
block 16, chunk 256, pinned host chunks): on the GPU's clock, from the point where the save is
enqueued to the sampled tokens' arrival in pinned host memory, with the host ahead of the GPU as in
the engine (a sleep kernel stands for the layers before), where the tail is the MLP of one 8B layer over the step's tokens (three bf16
matmuls) and the token copy is 8 KiB. Per size: ``none`` (the tail alone), kvtier's save
(``gather``) in its ``staged`` path with the default ring and with smaller and larger ring slots, and
in its ``uva`` path (the kernel writes host memory itself: no copy engine), and ``dma``: one plain
copy of the same bytes on a side stream (the copy engine without kvtier's kernels); ``tail_ms`` the median
and ``ratio`` against ``none`` in the same run, plus ``save_ms`` (the save's own completion).

    PYTHONPATH=. python3 benchmarks/bench_save_tail.py --out benchmarks/results/save_tail_h100.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time

import torch

from kvtier.transfer import PagedKV, Transfer, gather
from kvtier.transfer import triton_kernels as tk

L, H, D, BS, T = 32, 8, 128, 16, 256
DT = torch.bfloat16
HIDDEN, FFN = 4096, 14336  # Llama-3.1-8B
SPACER_CYCLES = 30_000_000  # ~15-20 ms of GPU clock: longer than the host's enqueueing
VARIANTS = {  # name: (mode, staging MiB, staging slots); None: no save
    "none": None,
    "staged": ("staged", 32, 2),  # kvtier's default ring, saves in pieces as large as a slot (before 1e4188d)
    "staged-8M": ("staged", 8, 2),
    "staged-8M-4slots": ("staged", 8, 4),
    "staged-128M": ("staged", 128, 2),
    "uva": ("uva", 32, 2),
    "dma": ("dma", 0, 0),  # one plain device->host copy of the same bytes on a side stream: the copy engine alone
}


def _tail(x: torch.Tensor, w_up: torch.Tensor, w_gate: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """One 8B layer's MLP over the step's tokens, then an argmax standing in for the sampler."""
    h = torch.nn.functional.silu(x @ w_gate) * (x @ w_up)
    return (h @ w_down)[-1024:].argmax(dim=-1)


def _plain_copy(dst: torch.Tensor, src: torch.Tensor, stream, after) -> Transfer:
    """``dst`` <- ``src[:len(dst)]`` on ``stream`` once ``after`` has fired, as one DMA."""
    stream.wait_event(after)
    with torch.cuda.stream(stream):
        dst.copy_(src[: dst.numel()], non_blocking=True)
        ev = torch.cuda.Event()
        ev.record(stream)
    return Transfer(ev)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokens", default="2048,8192")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_save_tail needs a CUDA GPU", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    sizes = [int(x) for x in args.tokens.split(",")]
    names = args.variants.split(",")
    nb = max(sizes) // BS + 64
    torch.manual_seed(0)
    layers = [torch.randn(2, nb, BS, H, D, device=dev).to(DT) for _ in range(L)]
    paged = PagedKV(layers, "flash", BS)
    cb = paged.chunk_nbytes(T)
    host = torch.empty(cb * (max(sizes) // T), dtype=torch.uint8, pin_memory=True)
    host.fill_(1)
    w_up, w_gate = (torch.randn(HIDDEN, FFN, device=dev, dtype=DT) * 0.02 for _ in range(2))
    w_down = torch.randn(FFN, HIDDEN, device=dev, dtype=DT) * 0.02
    tokens_host = torch.empty(2048, dtype=torch.int64, pin_memory=True)  # 16 KiB: vLLM's sampled ids
    dev_flat = torch.empty(host.numel(), dtype=torch.uint8, device=dev)  # the "dma" variant's source
    dma_stream = torch.cuda.Stream()
    cur = torch.cuda.current_stream()
    side = torch.cuda.Stream()  # waits for a save's end, to time it
    rows = []
    for n in sizes:
        x = torch.randn(n, HIDDEN, device=dev, dtype=DT)
        blocks = torch.randperm(nb)[: n // BS]
        mapping = (blocks[:, None] * BS + torch.arange(BS)).reshape(-1)  # on the host, as the worker has it
        chunks = [host[i * cb:(i + 1) * cb] for i in range(n // T)]
        base = None
        for name in names:
            v = VARIANTS[name]
            if v is not None and v[0] != "dma":
                # a save's pieces as large as the slot (the variants are ring sizes)
                tk.configure(mode=v[0], staging_bytes=v[1] << 20, staging_slots=v[2], save_piece_bytes=v[1] << 20)
            tails, saves, hosts, ahead = [], [], [], 0
            for rep in range(args.reps + 2):  # the first two warm up (Triton variants, the ring)
                torch.cuda.synchronize()
                # The GPU busy with the layers before: the host runs ahead of it, as in the engine.
                torch.cuda._sleep(SPACER_CYCLES)
                start = torch.cuda.Event(enable_timing=True)
                start.record(cur)
                t0 = time.perf_counter()
                if v is None:
                    save = None
                elif v[0] == "dma":
                    save = _plain_copy(host[: n * paged.chunk_nbytes(1)], dev_flat, dma_stream, start)
                else:
                    save = gather(paged, mapping, chunks, stream=cur)
                t_host = time.perf_counter() - t0
                ids = _tail(x, w_up, w_gate, w_down)
                tokens_host[: ids.numel()].copy_(ids, non_blocking=True)
                done = torch.cuda.Event(enable_timing=True)
                done.record(cur)
                was_ahead = not start.query()  # everything enqueued before the GPU got to it
                saved = None
                if save is not None:
                    save.wait_on(side)
                    saved = torch.cuda.Event(enable_timing=True)
                    saved.record(side)
                torch.cuda.synchronize()
                if rep >= 2:
                    tails.append(start.elapsed_time(done))
                    saves.append(start.elapsed_time(saved) if saved is not None else 0.0)
                    hosts.append(1e3 * t_host)
                    ahead += was_ahead
            row = {"tokens": n, "variant": name, "save_bytes": n * paged.chunk_nbytes(1),
                   "tail_ms": statistics.median(tails), "save_ms": statistics.median(saves) if v else None,
                   "save_enqueue_host_ms": statistics.median(hosts) if v else None,
                   "host_ahead_of_gpu": f"{ahead}/{args.reps}"}
            base = row["tail_ms"] if name == "none" else base
            row["ratio"] = row["tail_ms"] / base if base else None
            rows.append(row)
            print(json.dumps(row), flush=True)
        tk.configure(mode="staged", staging_bytes=32 << 20, staging_slots=2, save_piece_bytes=8 << 20)
    result = {"command": "python3 " + " ".join(shlex.quote(a) for a in sys.argv), "gpu": torch.cuda.get_device_name(),
              "torch": torch.__version__, "rows": rows}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
