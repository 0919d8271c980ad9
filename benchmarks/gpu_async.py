"""Decode latency of running requests while long cached prompts arrive (issue 12).

32 requests decode (1K-token prompts, 256 new tokens each); every 0.5 s a request arrives
whose 32K-token prefix kvtier holds in its cpu tier (stored by a warm-up, then vLLM's own
prefix cache reset). Per mode, one engine process: the inter-token latency (ITL) of the
running requests, p50/p99, and the TTFT of the arriving ones:

- ``no_arrivals``: the decode batch alone (each engine measures its own);
- ``sync``: kvtier's layer-wise loads inside the step (async scheduling off);
- ``async``: every load in kvtier's load thread (``load_mode: async``);
- ``auto``: kvtier's default (async scheduling on: inline when the engine is idle or the
  load is small, background beside running requests);
- ``native``: vLLM's own CPU offload (``kv_offloading_size``).

    python3 benchmarks/gpu_async.py                 # on the GPU machine
    python3 benchmarks/gpu_async.py --cpu           # dry run: tiny model on vLLM's CPU engine
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_vllm import STATE, _drop_page_cache, _setup, kv_bytes_per_token  # noqa: E402

from kvtier.vllm.phases import run_engine_child, shutdown_engine, start_llm  # noqa: E402

MARK = "@@GPU-ASYNC@@"


def _child(spec: dict) -> dict:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    llm = start_llm(spec["model"], {"skip_tokenizer_init": True, **spec["engine"]}, spec["kvtier"])
    one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)

    def store(prompts: list[list[int]], settle_s: float) -> None:
        for p in prompts:
            llm.generate([TokensPrompt(prompt_token_ids=p)], one, use_tqdm=False)
            time.sleep(settle_s)  # kvtier writes behind to disk meanwhile

    disk = spec.get("disk_arrivals") or []
    store(disk, 3.0)  # oldest: pushed out of the cpu tier by what follows, kept on disk
    store(spec["arrivals"], 0.0)
    llm.generate([TokensPrompt(prompt_token_ids=p) for p in spec["running"]], one, use_tqdm=False)  # warm
    time.sleep(spec["settle_s"])  # the write-behind is done before anything is measured
    out = {}
    runs = [("no_arrivals", []), ("arrivals", spec["arrivals"])] + ([("arrivals_disk", disk)] if disk else [])
    for run, arrivals in runs:
        llm.reset_prefix_cache()
        time.sleep(1.0)
        out[run] = _measure(llm.llm_engine, spec, arrivals, drop_page_cache=run == "arrivals_disk")
    shutdown_engine(llm)
    return out


def _measure(eng, spec: dict, arrivals: list[list[int]], drop_page_cache: bool) -> dict:
    """Decode the running requests while ``arrivals`` come in; ITL of the running ones, TTFT of the arrivals."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    dec = SamplingParams(max_tokens=spec["new_tokens"], temperature=0.0, ignore_eos=True)
    dropped = _drop_page_cache() if drop_page_cache else None
    t0 = time.perf_counter()
    times: dict[str, list[float]] = {}
    added: dict[str, float] = {}
    cached: dict[str, int | None] = {}  # prompt tokens the engine did not compute, per arrival
    for i, p in enumerate(spec["running"]):
        eng.add_request(f"{i}", TokensPrompt(prompt_token_ids=p), dec)
    pending = list(enumerate(arrivals))
    while eng.has_unfinished_requests() or pending:
        now = time.perf_counter()
        while pending and now - t0 >= spec["interval_s"] * (pending[0][0] + 1):
            i, p = pending.pop(0)
            rid = f"{1000 + i}"  # LLMEngine wants int-like ids: 1000+ are the arrivals
            eng.add_request(rid, TokensPrompt(prompt_token_ids=p), one)
            added[rid] = time.perf_counter()
        if not eng.has_unfinished_requests():  # step() would wait for output forever
            time.sleep(0.001)
            continue
        for o in eng.step():
            rid = o.request_id.split("-")[0]
            if rid in added:
                cached[rid] = getattr(o, "num_cached_tokens", None)
            n = len(o.outputs[0].token_ids)
            ts = times.setdefault(rid, [])
            while len(ts) < n:
                ts.append(time.perf_counter())
    running = [ts for rid, ts in times.items() if rid not in added]
    itl = [b - a for ts in running for a, b in zip(ts, ts[1:])]
    # Only the window in which arrivals happen (and the same window without them).
    first = min(ts[0] for ts in running)
    window = spec["interval_s"] * (len(spec["arrivals"]) + 2)
    itl_w = [b - a for ts in running for a, b in zip(ts, ts[1:]) if a - first < window]
    ttft = [times[r][0] - added[r] for r in added]
    return {"itl_p50_ms": 1e3 * statistics.median(itl_w), "itl_p99_ms": 1e3 * _p99(itl_w),
            "itl_all_p99_ms": 1e3 * _p99(itl), "ttft_s": ttft,
            "ttft_p50_s": statistics.median(ttft) if ttft else None, "wall_s": time.perf_counter() - t0,
            "page_cache_dropped": dropped, "cached_tokens": [cached.get(r) for r in added],
            **({"t0": t0, "added": added, "token_times": times} if spec.get("keep_times") else {})}


def _p99(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(0.99 * len(xs)))]


def _run(spec: dict) -> dict:
    return run_engine_child([sys.executable, __file__, "--child"], spec, MARK, timeout=1500)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true")
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--modes", default="auto,async,sync,native")
    ap.add_argument("--trace", default=None, help="directory: kvtier's spans (KVTIER_TRACE) and every token's "
                    "time per mode, to find what delays the running requests")
    ap.add_argument("--disk", action=argparse.BooleanOptionalAction, default=True,
                    help="also arrivals whose prefix only the disk tier holds (page cache dropped)")
    ap.add_argument("--out", default="benchmarks/results/gpu_async_h200.json")
    args = ap.parse_args()
    if args.child:
        result = _child(json.loads(sys.stdin.read()))
        sys.stdout.write(MARK + json.dumps(result) + "\n")
        sys.stdout.flush()
        os._exit(0)
    STATE.mkdir(parents=True, exist_ok=True)
    model, engine, _, vocab, _ = _setup(args.cpu)
    rnd = random.Random(5)
    if args.cpu:
        n_run, ctx, prefix, new, arrivals, interval = 8, 128, 1024, 64, 3, 0.3
        engine = {**engine, "max_model_len": 2048, "max_num_batched_tokens": 1024}
        modes = [m for m in args.modes.split(",") if m != "native"]
    else:
        n_run, ctx, prefix, new, arrivals, interval = 32, 1024, 32768, 256, 4, 0.5
        modes = args.modes.split(",")
    def prompts(n: int, length: int) -> list[list[int]]:
        return [[rnd.randrange(10, vocab - 10) for _ in range(length)] for _ in range(n)]

    spec = {"model": model, "new_tokens": new, "interval_s": interval, "running": prompts(n_run, ctx),
            "arrivals": prompts(arrivals, prefix + 16), "settle_s": 2.0 if args.cpu else 15.0}
    disk_arrivals = prompts(arrivals, prefix + 16) if args.disk else []
    # The cpu tier holds the arrivals and the running prompts, not the disk arrivals stored before
    # them (least recently used, pushed out to the disk tier).
    per_token = kv_bytes_per_token(model, args.cpu)
    held = per_token * (arrivals * prefix + n_run * ctx)
    disk_dir = STATE / "async-disk"
    kv = {"tiers": ["cpu", "disk"], "cpu_bytes": held + 16 * per_token * 256, "disk_path": str(disk_dir),
          "disk_bytes": 3 * held}
    configs = {"auto": ({**engine, "async_scheduling": True}, {**kv, "load_mode": "auto"}),
               "async": ({**engine, "async_scheduling": True}, {**kv, "load_mode": "async"}),
               "sync": ({**engine, "async_scheduling": False}, {**kv, "load_mode": "sync"}),
               "native": ({**engine, "kv_offloading_size": 24.0, "kv_offloading_backend": "native"}, None)}
    result = {"command": "python3 benchmarks/gpu_async.py " + " ".join(sys.argv[1:]),
              "workload": {"running": n_run, "context": ctx, "new_tokens": new, "arrival_prefix": prefix,
                           "arrivals": arrivals, "interval_s": interval}, "kvtier": kv, "modes": {}, "no_arrivals": {}}
    for mode in modes:
        eng, kvc = configs[mode]
        shutil.rmtree(disk_dir, ignore_errors=True)
        t = time.time()
        if args.trace:
            Path(args.trace).mkdir(parents=True, exist_ok=True)
            os.environ["KVTIER_TRACE"] = str(Path(args.trace) / f"trace_{mode}.jsonl")
        r = _run({**spec, "engine": eng, "kvtier": kvc, "disk_arrivals": disk_arrivals if kvc else [],
                  "keep_times": bool(args.trace)})
        os.environ.pop("KVTIER_TRACE", None)
        if args.trace:
            (Path(args.trace) / f"times_{mode}.json").write_text(json.dumps(r))
            for run in r.values():
                for k in ("t0", "added", "token_times"):
                    run.pop(k, None)
        print(f"{mode}: {time.time() - t:.0f} s  no arrivals {r['no_arrivals']['itl_p99_ms']:.1f} ms p99", flush=True)
        result["no_arrivals"][mode] = r["no_arrivals"]
        for run, name in (("arrivals", mode), ("arrivals_disk", f"{mode}_disk")):
            if run in r:
                a = r[run]
                print(f"  {name}: itl p50 {a['itl_p50_ms']:.1f} p99 {a['itl_p99_ms']:.1f} ms, "
                      f"ttft p50 {a['ttft_p50_s']:.3f} s, cached tokens {a['cached_tokens']}", flush=True)
                result["modes"][name] = {k: a[k] for k in ("itl_p50_ms", "itl_p99_ms", "ttft_p50_s")}
                result["modes"][name]["detail"] = a
    shutil.rmtree(disk_dir, ignore_errors=True)
    base = result["no_arrivals"].get("auto")
    if base:
        result["modes"]["no_arrivals"] = {k: base[k] for k in ("itl_p50_ms", "itl_p99_ms")} | {"ttft_p50_s": None}
    try:
        import torch
        import vllm

        result["vllm_version"] = vllm.__version__
        result["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (CPU dry run)"
    except Exception:  # noqa: BLE001
        pass
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
