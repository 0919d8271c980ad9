"""Host time of kvtier's work on the engine thread for one long prompt (issue 28): the scheduler's
lookup, and the worker's planning of its load and of its save, against the per-chunk planner
kvtier used before (rebuilt here as the baseline, same run, same machine).

A 32K-token prompt (128 chunks of 256 tokens, block size 16) whose chunks are in the cpu tier; a
CPU paged cache (planning does not depend on the cache's device until the mapping is uploaded).
Goal (issue 28): each at most 0.3 ms.

    .venv/bin/python benchmarks/bench_plan.py --json benchmarks/results/plan_cpu2.json
"""

from __future__ import annotations

import argparse
import sys

import torch

from _common import median_s, merge_json

from kvtier.config import KVTierConfig
from kvtier.keys import Namespace, chunk_keys
from kvtier.layout import ChunkLayout
from kvtier.store import Store
from kvtier.transfer import PagedKV
from kvtier.vllm.scheduler import LoadSpec, PrefixLedger, SaveSpec
from kvtier.vllm.worker import KVWorker

LAYERS, HEADS, DIM, BLOCK, CHUNK = 2, 1, 16, 16, 256


def per_chunk_plan(worker: KVWorker, spec: LoadSpec) -> tuple[torch.Tensor, list, set[int]]:
    """The baseline: the planner before issue 28 (torch per spec, a slice and a set per chunk)."""
    c, bs = worker.chunk_size, worker.block_size
    got = [worker.store.cpu.acquire(k) for k in spec.keys]
    n = len(got)
    per = c // bs
    covered = max(0, min(n, len(spec.block_ids) // per - spec.first_chunk))
    blocks_t = torch.as_tensor(spec.block_ids[spec.first_chunk * per:(spec.first_chunk + covered) * per])
    slots = torch.full((n, c), -1, dtype=torch.int64)
    slots[:covered] = (blocks_t.view(covered, per, 1) * bs + torch.arange(bs)).view(covered, -1)
    tok = torch.arange(spec.first_chunk * c, (spec.first_chunk + n) * c).view(n, c)
    slots[(tok < spec.start) | (tok >= spec.end)] = -1
    rows, blocks, bufs = [], set(), []
    for i, ref in enumerate(got):
        lo, hi = max(spec.start, (spec.first_chunk + i) * c), min(spec.end, (spec.first_chunk + i + 1) * c)
        rows.append(i)
        blocks |= set(spec.block_ids[lo // bs:(hi - 1) // bs + 1])
        bufs.append(ref.data[:worker.chunk_nbytes])
    mapping = torch.cat([slots[rows].view(-1)])
    int(mapping.max())
    for ref in got:
        ref.release()
    return mapping, bufs, blocks


def median_us(fn, reps: int) -> float:
    """:func:`median_s` in microseconds, after a few warm-up calls."""
    for _ in range(5):
        fn()
    return median_s(fn, reps) * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--json", default=None)
    ap.add_argument("--label", default="run")
    args = ap.parse_args()
    chunks = args.tokens // CHUNK
    blocks = chunks * CHUNK // BLOCK + 8
    layout = ChunkLayout(LAYERS, CHUNK, HEADS * DIM, torch.float32)
    store = Store(KVTierConfig(chunk_size=CHUNK, tiers=("cpu",), cpu_bytes=(2 * chunks + 64) * layout.nbytes),
                  layout, pin=False)
    caches = {f"model.layers.{i}.self_attn.attn": torch.zeros((blocks, HEADS, BLOCK, 2 * DIM)) for i in range(LAYERS)}
    worker = KVWorker(store, PagedKV.from_vllm(caches, block_size=BLOCK), CHUNK)
    ns = Namespace("bench", "float32", LAYERS, HEADS, DIM)
    tokens = list(range(7, 7 + args.tokens + 1))
    keys = chunk_keys(ns, tokens, CHUNK)
    for k in keys:
        store.put(k, torch.zeros(layout.nbytes, dtype=torch.uint8))
    table = list(range(blocks))
    ledger = PrefixLedger(store, ns, CHUNK, BLOCK)
    spec = LoadSpec("r", 0, chunks * CHUNK, 0, keys, table)

    def plan_load() -> None:
        _, _, ld = worker._plan_loads_now([spec])
        for ref in ld.refs:
            ref.release()

    save_keys = [b"s%015d" % i for i in range(chunks)]

    def plan_save() -> None:
        worker._plan_saves([SaveSpec("s", list(range(chunks)), save_keys, table)])
        for *_, ref in worker._saves.items:
            ref.release()
        worker._saves = None

    row = {"tokens": args.tokens, "chunks": chunks,
           "lookup_us": median_us(lambda: ledger.num_new_matched_tokens(tokens, 0, "r"), args.reps),
           "plan_load_us": median_us(plan_load, args.reps),
           "plan_load_per_chunk_baseline_us": median_us(lambda: per_chunk_plan(worker, spec), args.reps),
           "plan_save_us": median_us(plan_save, args.reps), "goal_us": 300.0}
    row["plan_load_vs_baseline"] = row["plan_load_us"] / row["plan_load_per_chunk_baseline_us"]
    for k, v in row.items():
        print(f"{k:>34} {v:10.3f}" if isinstance(v, float) else f"{k:>34} {v:>10}")
    store.close(10)
    merge_json(args.json, args.label, {"command": "python " + " ".join(sys.argv), **row})
    return 0


if __name__ == "__main__":
    sys.exit(main())
