"""Where a kvtier hit's time goes inside a GPU vLLM engine: kvtier.trace timelines (issue 11).

For each prompt length: a cold run (kvtier saves), vLLM's prefix-cache hit, then kvtier
cpu-tier hits after ``reset_prefix_cache()``, with ``KVTIER_TRACE`` on. Two engines:
``parked`` (default async scheduling; kvtier's loads go through vLLM's async-load path)
and ``layerwise`` (async scheduling off, load_mode=sync: loads overlap the forward layer
by layer). Each hit's spans are written relative to the request's start, so the JSON shows
the steps, the host work of each and the waits.

``--profile``: vLLM's torch profiler around the second cold run and the second hit of each
length; :func:`gpu_timeline` reduces each trace to what the GPU streams did (copies with their
sizes, busy time per stream) and the host calls that blocked, relative to the trace's start.
``--tiers cpu,disk``: the tiers of ``benchmarks/gpu_vllm.py`` (its disk tier writes behind).

    python3 benchmarks/gpu_hit_trace.py            # on the GPU machine
    python3 benchmarks/gpu_hit_trace.py --cpu      # dry run on vLLM's CPU engine
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_vllm import STATE, _prompts, _setup  # noqa: E402

from kvtier.trace import summarize  # noqa: E402
from kvtier.vllm.phases import run_phase  # noqa: E402


def _profiled(profile: str | None, name: str, step: dict) -> list[dict]:
    return [{"op": "profile_start", "prefix": name}, step, {"op": "profile_stop"}] if profile else [step]


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


def gpu_timeline(path: Path) -> dict:
    """What one torch-profiler trace shows: per GPU stream its busy time and copies, and host
    runtime calls over 0.5 ms (waits), in ms from the first event."""
    import gzip

    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        events = [e for e in json.load(f).get("traceEvents", []) if e.get("ph") == "X" and "dur" in e]
    if not events:
        return {"file": path.name, "events": 0}
    t0 = min(e["ts"] for e in events)
    ms = lambda us: round((us - t0) / 1e3, 3)  # noqa: E731
    streams: dict = {}
    for e in events:
        if e.get("cat") not in ("kernel", "gpu_memcpy", "gpu_memset"):
            continue
        st = streams.setdefault(str(e.get("args", {}).get("stream", e.get("tid"))),
                                {"busy_ms": 0.0, "first_ms": ms(e["ts"]), "last_end_ms": 0.0, "kernels": 0,
                                 "copies": []})
        st["busy_ms"] += e["dur"] / 1e3
        st["last_end_ms"] = max(st["last_end_ms"], ms(e["ts"] + e["dur"]))
        if e["cat"] == "gpu_memcpy":
            st["copies"].append([e["name"].replace("Memcpy ", ""), e.get("args", {}).get("bytes"), ms(e["ts"]),
                                 round(e["dur"] / 1e3, 3)])
        else:
            st["kernels"] += 1
    for st in streams.values():
        st["busy_ms"] = round(st["busy_ms"], 3)
        big = [c for c in st["copies"] if (c[1] or 0) >= 1 << 20]
        st["big_copies"] = {"n": len(big), "bytes": sum(c[1] for c in big),
                            "first_ms": min((c[2] for c in big), default=None),
                            "last_end_ms": max((c[2] + c[3] for c in big), default=None)}
        st["copies"] = [c for c in st["copies"] if (c[1] or 0) < 1 << 20][:40]  # the small ones, in full
    waits = [[e["name"], ms(e["ts"]), round(e["dur"] / 1e3, 3)] for e in events
             if e.get("cat") == "cuda_runtime" and e["dur"] >= 500]
    return {"file": path.name, "events": len(events), "end_ms": ms(max(e["ts"] + e["dur"] for e in events)),
            "streams": streams, "host_waits": waits[:40]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true")
    ap.add_argument("--modes", default="parked,layerwise")
    ap.add_argument("--out", default="benchmarks/results/gpu_hit_trace_h200.json")
    ap.add_argument("--tiers", default="cpu", help="cpu, or cpu,disk (the tiers of gpu_vllm.py)")
    ap.add_argument("--profile", default=None, help="directory for torch-profiler traces (see the docstring)")
    args = ap.parse_args()
    STATE.mkdir(parents=True, exist_ok=True)
    model, engine, kv_sizes, vocab, lengths = _setup(args.cpu)
    prompts = _prompts(vocab, lengths, 2)
    reset = {"op": "reset_prefix_cache"}
    steps = [{"op": "ttft", "prompt": prompts[min(prompts)][0][:64]}]
    for n, (p, q) in prompts.items():
        steps += [reset, {"op": "ttft", "prompt": p}, {"op": "ttft", "prompt": p}]  # cold (saves), APC hit
        steps += [reset] + _profiled(args.profile, f"cold{n}", {"op": "ttft", "prompt": q})  # a second cold
        steps += [reset, {"op": "ttft", "prompt": p}, reset]  # kvtier hits
        steps += _profiled(args.profile, f"hit{n}", {"op": "ttft", "prompt": q})
    result: dict = {"command": "python3 benchmarks/gpu_hit_trace.py " + " ".join(sys.argv[1:]), "modes": {}}
    for mode in args.modes.split(","):
        trace = STATE / f"trace-{mode}.jsonl"
        trace.unlink(missing_ok=True)
        os.environ["KVTIER_TRACE"] = str(trace)
        kv = {"tiers": args.tiers.split(","), **kv_sizes, "load_mode": "sync" if mode == "layerwise" else "auto"}
        if "disk" in kv["tiers"]:
            kv["disk_path"] = str(STATE / f"trace-disk-{mode}")
        eng = {**engine, "async_scheduling": mode != "layerwise"}
        if args.profile:
            eng["profiler_config"] = {"profiler": "torch", "torch_profiler_dir": str(Path(args.profile) / mode),
                                      "torch_profiler_with_stack": False,
                                      "torch_profiler_dump_cuda_time_total": False}
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
        if args.profile:
            result["modes"][mode]["gpu"] = [gpu_timeline(f) for f in sorted((Path(args.profile) / mode).glob("*.json*"))]
        shutil.rmtree(kv.get("disk_path", ""), ignore_errors=True)
        for row in rows:
            print(mode, row, flush=True)
    os.environ.pop("KVTIER_TRACE", None)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
