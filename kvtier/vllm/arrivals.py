"""Decode latency of running requests while long cached prompts arrive (issue 12), in one engine.

The scenario of ``benchmarks/gpu_async.py`` (on a GPU) and ``kvtier bench vllm --arrivals``
(scaled down, on vLLM's CPU engine): requests decode while, every ``interval_s``, a request
arrives whose long prefix kvtier holds -- in its cpu tier, then (``disk_arrivals``) only on
disk. One engine process per mode (:func:`run_mode`) stores the prompts, then measures the
inter-token latency (ITL) of the running requests without arrivals, with cpu-tier arrivals
and with disk-tier arrivals (the page cache dropped where it can be), and the TTFT and
cached tokens of each arrival.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kvtier.vllm.phases import (drop_page_cache_now, reset_prefix_cache, run_engine_child, shutdown_engine, start_llm,
                                trace_engines_to)

MARK = "@@KVTIER-ARRIVALS@@"
# The scenario scaled down to vLLM's CPU engine (kvtier bench vllm --arrivals, gpu_async.py --cpu):
# 8 requests decode 64 tokens of 128-token prompts while 3 with a 1K-token cached prefix arrive.
CPU_SCENARIO = dict(running=8, context=128, prefix=1024, new_tokens=64, arrivals=3, interval_s=0.3, settle_s=2.0,
                    disk_settle_s=0.5)
ENGINE_CPU_SCENARIO = dict(max_model_len=2048, max_num_batched_tokens=1024)


def bench_arrivals(model: str, engine: dict[str, Any], kv_bytes_per_token: int, vocab: int, modes: list[str],
                   disk_dir: str | Path, *, running: int, context: int, prefix: int, new_tokens: int,
                   arrivals: int, interval_s: float, settle_s: float, disk_settle_s: float, disk: bool = True,
                   native_gib: float = 24.0, trace: str | None = None,
                   others: dict[str, tuple[dict[str, Any], dict[str, str]]] | None = None,
                   out: Callable[[str], None] = print) -> dict[str, Any]:
    """Each of ``modes`` (auto, async, sync: kvtier's ``load_mode``; native: vLLM's own CPU
    offload; a name in ``others``: another connector, its engine arguments and the environment
    its engine process needs) in its own engine; returns ``{"modes": {mode: {itl_p50_ms, itl_p99_ms, ttft_p50_s,
    detail}, mode_disk: ...}, "no_arrivals": {mode: ...}, ...}``. The cpu tier is sized to hold
    the arrivals and the running prompts, not the disk arrivals stored before them."""
    rnd = random.Random(5)

    def prompts(n: int, length: int) -> list[list[int]]:
        return [[rnd.randrange(10, vocab - 10) for _ in range(length)] for _ in range(n)]

    spec = {"model": model, "new_tokens": new_tokens, "interval_s": interval_s, "running": prompts(running, context),
            "arrivals": prompts(arrivals, prefix + 16), "settle_s": settle_s, "disk_settle_s": disk_settle_s}
    disk_arrivals = prompts(arrivals, prefix + 16) if disk else []
    held = kv_bytes_per_token * (arrivals * prefix + running * context)
    disk_dir = Path(disk_dir)
    kv = {"tiers": ["cpu", "disk"], "cpu_bytes": held + 16 * kv_bytes_per_token * 256, "disk_path": str(disk_dir),
          "disk_bytes": 3 * held}
    configs = {"auto": ({**engine, "async_scheduling": True}, {**kv, "load_mode": "auto"}),
               "async": ({**engine, "async_scheduling": True}, {**kv, "load_mode": "async"}),
               "sync": ({**engine, "async_scheduling": False}, {**kv, "load_mode": "sync"}),
               "native": ({**engine, "kv_offloading_size": native_gib, "kv_offloading_backend": "native"}, None)}
    envs = {}
    for name, (args, env) in (others or {}).items():
        configs[name] = ({**engine, "async_scheduling": True, **args}, None)
        envs[name] = env
    result: dict[str, Any] = {
        "workload": {"running": running, "context": context, "new_tokens": new_tokens, "arrival_prefix": prefix,
                     "arrivals": arrivals, "interval_s": interval_s}, "kvtier": kv, "modes": {}, "no_arrivals": {}}
    for mode in modes:
        eng, kvc = configs[mode]
        shutil.rmtree(disk_dir, ignore_errors=True)
        t = time.time()
        trace_engines_to(trace, mode)
        if trace:
            os.environ.setdefault("KVTIER_TRACE_SAMPLE_MS", "5")  # the engine thread's stacks in late steps
        try:
            r = run_mode({**spec, "engine": eng, "kvtier": kvc, "disk_arrivals": disk_arrivals if kvc else [],
                          "keep_times": bool(trace), "env": envs.get(mode, {})})
        finally:
            trace_engines_to(None, "")
        if trace:
            (Path(trace) / f"times_{mode}.json").write_text(json.dumps(r))
            for run in r.values():
                for k in ("t0", "added", "token_times"):
                    run.pop(k, None)
        out(f"{mode}: {time.time() - t:.0f} s  no arrivals: ITL p99 {r['no_arrivals']['itl_p99_ms']:.1f} ms")
        result["no_arrivals"][mode] = r["no_arrivals"]
        for run, name in (("arrivals", mode), ("arrivals_disk", f"{mode}_disk")):
            if run in r:
                a = r[run]
                out(f"  {name}: ITL p50 {a['itl_p50_ms']:.1f} p99 {a['itl_p99_ms']:.1f} ms (from the first arrival "
                    f"{a['itl_p99_from_first_arrival_ms'] or 0:.1f}), TTFT p50 {a['ttft_p50_s']:.3f} s, "
                    f"cached tokens {a['cached_tokens']}")
                result["modes"][name] = {k: a[k] for k in ("itl_p50_ms", "itl_p99_ms", "ttft_p50_s")}
                result["modes"][name]["detail"] = a
    shutil.rmtree(disk_dir, ignore_errors=True)
    base = result["no_arrivals"].get("auto") or next(iter(result["no_arrivals"].values()), None)
    if base:
        result["modes"]["no_arrivals"] = {k: base[k] for k in ("itl_p50_ms", "itl_p99_ms")} | {"ttft_p50_s": None}
    return result


def run_mode(spec: dict[str, Any], timeout: float = 1500.0) -> dict[str, Any]:
    """One engine (``spec``: model, engine, kvtier, running, arrivals, disk_arrivals, new_tokens,
    interval_s, settle_s, keep_times); its runs: no_arrivals, arrivals[, arrivals_disk]."""
    return run_engine_child([sys.executable, "-m", "kvtier.vllm.arrivals"], spec, MARK, timeout=timeout)


def _child(spec: dict) -> dict:
    """In the engine process's parent: store the prompts, then measure each run (see :func:`run_mode`)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    os.environ.update(spec.get("env") or {})  # another connector's settings, before its engine starts
    # allocator_counters travels to the engine's worker as a function (collective_rpc), which vLLM
    # sends only with pickle allowed: local processes of this benchmark alone.
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    llm = start_llm(spec["model"], {"skip_tokenizer_init": True, **spec["engine"]}, spec["kvtier"])
    one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)

    def store(prompts: list[list[int]], settle_s: float) -> None:
        for p in prompts:
            llm.generate([TokensPrompt(prompt_token_ids=p)], one, use_tqdm=False)
            time.sleep(settle_s)  # kvtier writes behind to disk meanwhile

    disk = spec.get("disk_arrivals") or []
    store(disk, spec.get("disk_settle_s", 3.0))  # oldest: pushed out of the cpu tier by what follows, kept on disk
    store(spec["arrivals"], 0.0)
    llm.generate([TokensPrompt(prompt_token_ids=p) for p in spec["running"]], one, use_tqdm=False)  # warm
    time.sleep(spec["settle_s"])  # the write-behind is done before anything is measured
    out = {}
    runs = [("no_arrivals", []), ("arrivals", spec["arrivals"])] + ([("arrivals_disk", disk)] if disk else [])
    for run, arrivals in runs:
        reset_prefix_cache(llm)
        time.sleep(1.0)
        before = _worker_counters(llm)
        out[run] = _measure(llm.llm_engine, spec, arrivals, drop_page_cache=run == "arrivals_disk")
        out[run]["allocator"] = {"before": before, "after": _worker_counters(llm)}
    shutdown_engine(llm)
    return out


ALLOCATOR_COUNTERS = ("num_alloc_retries", "num_device_alloc", "num_device_free", "num_sync_all_streams",
                      "reserved_bytes.all.current")
HOST_COUNTERS = ("num_host_alloc", "num_host_free", "host_alloc_time.total", "host_free_time.total")


def allocator_counters(worker: object = None) -> dict[str, Any]:
    """torch's CUDA allocator counters in this process (run in the engine's worker by
    ``collective_rpc``): a device allocation retried after freeing cached memory, or a pinned host
    allocation, can stall every thread's CUDA calls; these show whether one happened during a run.
    Empty without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return {}
    dev, host = torch.cuda.memory_stats(), getattr(torch.cuda, "host_memory_stats", dict)()
    return {**{k: dev.get(k) for k in ALLOCATOR_COUNTERS}, **{k: host.get(k) for k in HOST_COUNTERS}}


def _worker_counters(llm) -> list | dict:
    try:
        return llm.collective_rpc(allocator_counters)
    except Exception as e:  # a figure of the harness's, never a reason to lose the run's
        return {"error": f"{type(e).__name__}: {e}"}


def _measure(eng, spec: dict, arrivals: list[list[int]], drop_page_cache: bool) -> dict:
    """Decode the running requests while ``arrivals`` come in; ITL of the running ones, TTFT of the arrivals."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    dec = SamplingParams(max_tokens=spec["new_tokens"], temperature=0.0, ignore_eos=True)
    dropped = drop_page_cache_now() if drop_page_cache else None
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
    gaps = [(a, b - a) for ts in running for a, b in zip(ts, ts[1:])]  # (when it began, how long)
    itl = [g for _, g in gaps]
    # Only the window in which arrivals happen (and the same window without them).
    first = min(ts[0] for ts in running)
    window = spec["interval_s"] * (len(spec["arrivals"]) + 2)
    itl_w = [g for a, g in gaps if a - first < window]
    # The same window from the first arrival (or when it was due) on: without the running requests'
    # own admission, which a connector that computes their cached prompts makes slow (issue 28).
    since = min(added.values()) if added else t0 + spec["interval_s"]
    itl_since = [g for a, g in gaps if a >= since and a - first < window]
    ttft = [times[r][0] - added[r] for r in added]
    return {"itl_p50_ms": 1e3 * statistics.median(itl_w), "itl_p99_ms": 1e3 * _p99(itl_w),
            "itl_p99_from_first_arrival_ms": 1e3 * _p99(itl_since) if itl_since else None,
            "itl_all_p99_ms": 1e3 * _p99(itl), "ttft_s": ttft,
            "ttft_p50_s": statistics.median(ttft) if ttft else None, "wall_s": time.perf_counter() - t0,
            "page_cache_dropped": dropped, "cached_tokens": [cached.get(r) for r in added],
            **({"t0": t0, "added": added, "token_times": times} if spec.get("keep_times") else {})}


def _p99(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(0.99 * len(xs)))]


if __name__ == "__main__":
    result = _child(json.loads(sys.stdin.read()))
    sys.stdout.write(MARK + json.dumps(result) + "\n")
    sys.stdout.flush()
    os._exit(0)
