"""Where a kvtier hit's time goes inside a GPU vLLM engine: kvtier.trace timelines (issue 11).

For each prompt length: a cold run (kvtier saves), vLLM's prefix-cache hit, then kvtier
cpu-tier hits after ``reset_prefix_cache()``, with ``KVTIER_TRACE`` on. Two engines:
``parked`` (default async scheduling; kvtier's loads go through vLLM's async-load path)
and ``layerwise`` (async scheduling off, load_mode=sync: loads overlap the forward layer
by layer). Each hit's spans are written relative to the request's start, so the JSON shows
the steps, the host work of each and the waits.

    python3 benchmarks/gpu_hit_trace.py            # on the GPU machine
    python3 benchmarks/gpu_hit_trace.py --cpu      # dry run on vLLM's CPU engine
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_vllm import STATE, _prompts, _setup  # noqa: E402

from kvtier.trace import summarize  # noqa: E402
from kvtier.vllm.phases import run_phase  # noqa: E402


def _timelines(path: Path) -> list[dict]:
    """The spans inside each traced request, relative to its start (ms)."""
    recs = sorted((json.loads(line) for line in path.read_text().splitlines()), key=lambda r: r["t"])
    reqs = [r for r in recs if r["name"] == "phase.ttft"]
    out = []
    for r in reqs:
        t0, t1 = r["t"], r["t"] + r["dur"]
        spans = [{"at_ms": round((s["t"] - t0) * 1e3, 3), "ms": round(s["dur"] * 1e3, 3), "name": s["name"],
                  **{k: v for k, v in s.items() if k not in ("t", "dur", "name", "pid")}}
                 for s in recs if t0 <= s["t"] <= t1 and s["name"] != "phase.ttft"]
        out.append({"tokens": r["tokens"], "ttft_ms": round(r["dur"] * 1e3, 3), "spans": spans})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true")
    ap.add_argument("--modes", default="parked,layerwise")
    ap.add_argument("--out", default="benchmarks/results/gpu_hit_trace_h200.json")
    args = ap.parse_args()
    STATE.mkdir(parents=True, exist_ok=True)
    model, engine, kv_sizes, vocab, lengths = _setup(args.cpu)
    prompts = _prompts(vocab, lengths, 2)
    reset = {"op": "reset_prefix_cache"}
    steps = [{"op": "ttft", "prompt": prompts[min(prompts)][0][:64]}]
    for n, (p, q) in prompts.items():
        steps += [reset, {"op": "ttft", "prompt": p}, {"op": "ttft", "prompt": p}]  # cold (saves), APC hit
        steps += [reset, {"op": "ttft", "prompt": q}]  # a second cold
        steps += [reset, {"op": "ttft", "prompt": p}, reset, {"op": "ttft", "prompt": q}]  # kvtier hits
    result: dict = {"command": "python3 benchmarks/gpu_hit_trace.py " + " ".join(sys.argv[1:]), "modes": {}}
    for mode in args.modes.split(","):
        trace = STATE / f"trace-{mode}.jsonl"
        trace.unlink(missing_ok=True)
        os.environ["KVTIER_TRACE"] = str(trace)
        kv = {"tiers": ["cpu"], "cpu_bytes": kv_sizes["cpu_bytes"],
              "load_mode": "sync" if mode == "layerwise" else "async"}
        eng = {**engine, "async_scheduling": mode != "layerwise"}
        t = time.time()
        r = run_phase(model, steps, kv, eng)
        print(f"{mode}: {time.time() - t:.0f} s", flush=True)
        ttfts = [s for s in r["steps"] if s["op"] == "ttft"][1:]
        rows = []
        for i, n in enumerate(prompts):
            cold, apc, cold2, hit1, hit2 = ttfts[i * 5:(i + 1) * 5]
            rows.append({"tokens": n, "cold_s": [cold["s"], cold2["s"]], "apc_s": apc["s"],
                         "hit_s": [hit1["s"], hit2["s"]], "hit_cached": [hit1["cached"], hit2["cached"]],
                         "same_token": hit1["tokens"] == cold["tokens"] and hit2["tokens"] == cold2["tokens"]})
        result["modes"][mode] = {"rows": rows, "summary": summarize(str(trace)),
                                 "timelines": _timelines(trace)[1:]}
        for row in rows:
            print(mode, row, flush=True)
    os.environ.pop("KVTIER_TRACE", None)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
