"""Layer-wise loads and saves vs all layers at once, on a GPU (the connector's KVWorker).

Llama-3.1-8B KV geometry (32 layers, 8 KV heads x 128, bf16, flash layout, block
16, chunk 256), kvtier's real Store (pinned cpu tier). A "forward" is 32 layers of
bf16 matmuls on the compute stream, sized so that it takes about as long as the
copy. One step loads (or saves) ``--tokens`` tokens of prefix and runs the forward:

* ``forward``          -- the forward alone (no copy);
* ``copy``             -- the pinned contiguous copy of the same bytes alone (the limit);
* ``all-then-forward`` -- one copy of all layers, waited for before layer 0 (what a
  connector without layer hooks does), resp. one copy of all layers after the forward;
* ``layer-wise``       -- the connector's hooks: ``load_layer(l)`` before layer l,
  ``save_layer(l)`` after it, copies of layer groups (the worker's default,
  ``MIN_RUN_BYTES`` per run: 8 layers here) overlapping the compute of other layers;
* ``per-layer``        -- the same hooks with one copy per layer (``layers_per_copy=1``).

The step time is measured from the first host call to the end of ``finish_*``;
ratios are printed against ``forward + copy`` (no overlap) measured in the same run.

    PYTHONPATH=. python3 benchmarks/bench_layerwise.py --out benchmarks/results/layerwise_h100.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time

import torch

from kvtier.config import KVTierConfig
from kvtier.layout import ChunkLayout
from kvtier.store import Store
from kvtier.transfer import PagedKV
from kvtier.vllm.scheduler import LoadSpec, SaveSpec
from kvtier.vllm.worker import KVWorker

L, H, D, BS, C = 32, 8, 128, 16, 256
DT = torch.bfloat16


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args()
    n = args.tokens
    dev = torch.device("cuda")
    nb = n // BS + 64
    layers = [torch.randn(2, nb, BS, H, D, device=dev).to(DT) for _ in range(L)]
    paged = PagedKV.from_vllm({f"model.layers.{i}.self_attn.attn": t for i, t in enumerate(layers)})
    layout = ChunkLayout(L, C, H * D, DT)
    store = Store(KVTierConfig(chunk_size=C, tiers=("cpu",), cpu_bytes=(3 * n // C + 4) * layout.nbytes), layout)
    # Saves copy like loads here (the engine's default on a GPU is one save copy of all layers).
    w = KVWorker(store, paged, C, save_in_step=True)  # layer groups (the default for loads)
    w_all = KVWorker(store, paged, C, layers_per_copy=L)  # one copy of all layers
    w_one = KVWorker(store, paged, C, layers_per_copy=1, save_layers_per_copy=1)  # one copy per layer
    for x in (w, w_all, w_one):
        x.warm_up()
    keys = [f"lw-{i}".encode().ljust(16, b"\0") for i in range(n // C)]
    for k in keys:
        assert store.put(k, torch.randint(0, 255, (layout.nbytes,), dtype=torch.uint8))
    block_ids = torch.randperm(nb)[: n // BS].tolist()
    nbytes = n * paged.chunk_nbytes(1)
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    devbuf = torch.empty(nbytes, dtype=torch.uint8, device=dev)

    a = torch.randn(4096, 4096, device=dev, dtype=DT)
    comp = torch.cuda.Stream()

    def layer_compute(k: int) -> None:
        for _ in range(k):
            torch.mm(a, a)

    # Size the per-layer compute so the forward lasts about as long as the copy.
    with torch.cuda.stream(comp):
        t = time.perf_counter()
        host.copy_(devbuf, non_blocking=True)
        comp.synchronize()
        copy_s = time.perf_counter() - t
        t = time.perf_counter()
        layer_compute(20)
        comp.synchronize()
        mm_s = (time.perf_counter() - t) / 20
    per_layer = max(1, round(copy_s / L / mm_s))

    def timed(fn) -> float:
        ts = []
        for i in range(args.reps + 2):
            torch.cuda.synchronize()
            t = time.perf_counter()
            with torch.cuda.stream(comp):
                fn()
            comp.synchronize()
            torch.cuda.synchronize()
            if i >= 2:
                ts.append(time.perf_counter() - t)
        return statistics.median(ts)

    spec = LoadSpec("r", 0, n, 0, keys, block_ids)
    save_keys = [f"lw-save-{i}".encode().ljust(16, b"\0") for i in range(n // C)]

    def forward():
        for _ in range(L):
            layer_compute(per_layer)

    def load_all_then_forward():
        assert w_all.start_load([spec]) == (set(), set())
        w_all.load_layer(0)  # the one copy of every layer
        forward()
        assert w_all.finish_load() == (set(), set())

    def load_layer_wise(wk):
        assert wk.start_load([spec]) == (set(), set())
        for layer in range(L):
            wk.load_layer(layer)
            layer_compute(per_layer)
        assert wk.finish_load() == (set(), set())

    def save_forward_then_all():
        w_all.start_save([SaveSpec("r", list(range(n // C)), save_keys, block_ids)])
        forward()
        w_all.finish_save()
        w_all.drain_saves()

    def save_layer_wise(wk):
        wk.start_save([SaveSpec("r", list(range(n // C)), save_keys, block_ids)])
        for layer in range(L):
            layer_compute(per_layer)
            wk.save_layer(layer)
        wk.finish_save()
        wk.drain_saves()

    results = {"command": "python3 " + " ".join(shlex.quote(x) for x in sys.argv), "device":
               torch.cuda.get_device_name(), "torch": torch.__version__, "tokens": n, "bytes": nbytes,
               "matmuls_per_layer": per_layer, "layer_groups": w.groups}
    fwd = timed(forward)
    cp_load = timed(lambda: devbuf.copy_(host, non_blocking=True))
    cp_save = timed(lambda: host.copy_(devbuf, non_blocking=True))
    rows = {
        "forward": fwd, "copy-load": cp_load, "copy-save": cp_save,
        "load-all-then-forward": timed(load_all_then_forward),
        "load-layer-wise": timed(lambda: load_layer_wise(w)),
        "load-per-layer": timed(lambda: load_layer_wise(w_one)),
        "save-forward-then-all": timed(save_forward_then_all),
        "save-layer-wise": timed(lambda: save_layer_wise(w)),
        "save-per-layer": timed(lambda: save_layer_wise(w_one)),
    }
    for name, s in rows.items():
        serial = fwd + (cp_load if "load" in name else cp_save)
        results[name] = {"ms": s * 1e3, "vs_forward_plus_copy": s / serial if name.startswith(("load-", "save-"))
                         else None}
        print(f"{name:24s} {s * 1e3:8.2f} ms" + (f"   {s / serial:.2f} of forward+copy ({serial * 1e3:.2f} ms)"
                                                 if name.startswith(("load-", "save-")) else ""), flush=True)
    for name, x in (("groups", w), ("all", w_all), ("per_layer", w_one)):
        results[f"worker_stats_{name}"] = dict(x.stats)
        assert x.stats["skipped_saves"] == 0 and x.stats["failed_chunks"] == 0, x.stats
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    store.close()


if __name__ == "__main__":
    main()
