"""What a small parked load costs beside its copy (issue 25's fixed cost per load), on vLLM's CPU engine.

Under async scheduling every kvtier load is parked: the request waits off the batch until its load is
reported, then is scheduled again. Here a 2,048-token prompt whose first chunk (256 tokens) is in
kvtier's cpu tier (saved by an earlier 300-token request, vLLM's prefix cache reset since) against the
same prompt with nothing cached, in vLLM alone (same run, same machine). The difference is what a
1-chunk hit costs: its copy, the scheduling round trip, and any stall of the parked path.

    .venv/bin/python benchmarks/bench_parked_overhead.py --json benchmarks/results/parked_overhead_cpu2.json
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
from pathlib import Path

from _common import merge_json

from kvtier.models import make_random_llama
from kvtier.vllm.phases import run_phase

ENGINE = dict(max_model_len=4096, max_num_batched_tokens=4096, block_size=32, async_scheduling=True)


def ttfts(model: str, kvtier: dict | None, prompts: list[list[int]]) -> list[tuple[float, int]]:
    steps = [{"op": "ttft", "prompt": [5] * 40}]
    for p in prompts:
        steps += [{"op": "ttft", "prompt": p[:300]}, {"op": "reset_prefix_cache"}, {"op": "ttft", "prompt": p}]
    result = run_phase(model, steps, kvtier, ENGINE)
    timed = [s for s in result["steps"] if s["op"] == "ttft"][1:]
    return [(s["s"], s["cached"]) for s in timed[1::2]]


def summary(xs: list[float]) -> dict:
    xs = sorted(xs)
    return {"median_s": statistics.median(xs), "p90_s": xs[int(0.9 * (len(xs) - 1))], "max_s": xs[-1]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=20)
    ap.add_argument("--json", default=None)
    ap.add_argument("--label", default="cpu2")
    args = ap.parse_args()
    model = make_random_llama(Path("/tmp/kvtier-bench-parked/model"), "tiny")
    rnd = random.Random(1)
    prompts = [[rnd.randrange(10, 1000) for _ in range(2048)] for _ in range(args.prompts)]
    alone = ttfts(model, None, prompts)
    kv = ttfts(model, {"chunk_size": 256, "tiers": ["cpu"], "cpu_bytes": "256MiB"}, prompts)
    row = {"engine": ENGINE, "alone": summary([s for s, _ in alone]), "one_chunk_hit": summary([s for s, _ in kv]),
           "cached_tokens": sorted({c for _, c in kv}), "runs_s": {"alone": [s for s, _ in alone],
                                                                   "one_chunk_hit": [s for s, _ in kv]}}
    row["median_overhead_s"] = row["one_chunk_hit"]["median_s"] - row["alone"]["median_s"]
    row["slow_hits"] = sum(s > 2 * row["alone"]["median_s"] for s, _ in kv)
    print(f"alone median {row['alone']['median_s']:.4f} s, 1-chunk hit median {row['one_chunk_hit']['median_s']:.4f} s "
          f"(+{row['median_overhead_s'] * 1e3:.1f} ms), max {row['one_chunk_hit']['max_s']:.4f} s; "
          f"{row['slow_hits']} of {len(kv)} hits over twice vLLM alone's median")
    merge_json(args.json, args.label, {"command": "python " + " ".join(sys.argv), **row})
    return 0


if __name__ == "__main__":
    sys.exit(main())
