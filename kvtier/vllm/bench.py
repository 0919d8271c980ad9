"""`kvtier bench vllm`: time to first token and workload time on a real vLLM (CPU), side by side.

In one run, on a random-weight Llama (the ~82M "demo" model by default):
- TTFT of 1K and 4K-token prompts: cold (vLLM alone, and with kvtier saving), as a hit in
  vLLM's own prefix cache, as a kvtier hit from the cpu tier (vLLM's cache reset) and from
  the disk tier (engine restarted);
- a workload of requests over several long documents that do not all fit vLLM's KV pool:
  total time with vLLM's prefix caching only vs with kvtier, outputs compared.
Goals (issue 4): a kvtier hit within 2x of vLLM's own hit; >= 20x faster than cold at 4K.

``--arrivals`` (:func:`bench_arrivals_cpu`): the async-loading scenario of
``benchmarks/gpu_async.py`` scaled down to the CPU engine (:mod:`kvtier.vllm.arrivals`).
"""

from __future__ import annotations

import random
import statistics
import shutil
import sys
import tempfile
from collections.abc import Callable
from typing import Any

from kvtier.vllm.demo import model_dir
from kvtier.vllm.phases import DEMO_ENGINE, run_phase


def bench_vllm(size: str = "demo", lengths: tuple[int, ...] = (1024, 4096), docs: int = 4, doc_tokens: int = 2048,
               requests: int = 16, pool_blocks: int = 160, reps: int = 3,
               out: Callable[[str], None] = print) -> dict[str, Any]:
    from tqdm import tqdm

    from kvtier.models import SIZES, make_random_llama

    model = make_random_llama(model_dir(size), size)
    vocab = SIZES[size]["vocab_size"]
    rnd = random.Random(1)
    toks = lambda n: [rnd.randrange(3, vocab) for _ in range(n)]  # noqa: E731
    prompts = {n: toks(n) for n in lengths}
    warm = {"op": "ttft", "prompt": toks(40)}
    ttft = lambda p: {"op": "ttft", "prompt": p}  # noqa: E731
    reset = {"op": "reset_prefix_cache"}
    disk = tempfile.mkdtemp(prefix="kvtier-bench-disk-")
    kv = {"tiers": ["cpu", "disk"], "cpu_bytes": "2GiB", "disk_path": disk, "disk_bytes": "8GiB"}
    kv_wl = {**kv, "disk_path": disk + "-wl"}
    documents = [toks(doc_tokens) for _ in range(docs)]
    wl_prompts = [documents[i % docs] + toks(32) for i in range(requests)]
    wl_steps = [warm] + [{"op": "generate", "prompts": [p], "max_tokens": 8} for p in wl_prompts]
    small_pool = {"num_gpu_blocks_override": pool_blocks, "max_model_len": doc_tokens + 256}
    plan = [
        # Per length: the cold run, then `reps` hits (their median is reported: one TTFT on a
        # 2-core VM varies by tens of ms).
        ("vllm", None, [warm] + [s for n in lengths for s in [ttft(prompts[n])] * (1 + reps)], {}),
        # No pause after the first run: in vLLM's default multi-process engine the worker reports
        # its cpu tier's new chunks to the scheduler with each step's output.
        ("kvtier", kv, [warm] + [s for n in lengths for s in [ttft(prompts[n])] + [reset, ttft(prompts[n])] * reps],
         {}),
        ("kvtier_restart", kv, [warm] + [ttft(prompts[n]) for n in lengths], {}),
        ("workload_vllm", None, wl_steps, small_pool),
        ("workload_kvtier", kv_wl, wl_steps, small_pool),
    ]
    runs: dict[str, dict[str, Any]] = {}
    try:
        for name, cfg, steps, engine in tqdm(plan, desc="bench vllm", unit="engine", file=sys.stderr):
            runs[name] = run_phase(model, steps, cfg, engine)
    finally:
        shutil.rmtree(disk, ignore_errors=True)
        shutil.rmtree(disk + "-wl", ignore_errors=True)

    def ttfts(name: str) -> list[dict[str, Any]]:
        return [s for s in runs[name]["steps"][1:] if s["op"] == "ttft"]

    rows = []
    v, k, r = ttfts("vllm"), ttfts("kvtier"), ttfts("kvtier_restart")
    for i, n in enumerate(lengths):
        vs, ks = v[i * (1 + reps):(i + 1) * (1 + reps)], k[i * (1 + reps):(i + 1) * (1 + reps)]
        row = {"tokens": n, "cold_vllm_s": vs[0]["s"], "cold_kvtier_s": ks[0]["s"],
               "vllm_hit_s": statistics.median(x["s"] for x in vs[1:]),
               "kvtier_cpu_hit_s": statistics.median(x["s"] for x in ks[1:]),
               "vllm_hit_runs_s": [x["s"] for x in vs[1:]], "kvtier_cpu_hit_runs_s": [x["s"] for x in ks[1:]],
               "kvtier_disk_hit_s": r[i]["s"], "kvtier_cpu_hit_tokens": min(x["cached"] for x in ks[1:]),
               "kvtier_disk_hit_tokens": r[i]["cached"], "vllm_hit_tokens": min(x["cached"] for x in vs[1:]),
               "outputs_match": all(x["tokens"] == vs[0]["tokens"] for x in vs[1:] + ks + [r[i]])}
        row["kvtier_hit_vs_vllm_hit"] = row["kvtier_cpu_hit_s"] / row["vllm_hit_s"]
        row["speedup_vs_cold"] = row["cold_vllm_s"] / row["kvtier_cpu_hit_s"]
        row["disk_speedup_vs_cold"] = row["cold_vllm_s"] / row["kvtier_disk_hit_s"]
        rows.append(row)
    wv, wk = runs["workload_vllm"]["steps"][1:], runs["workload_kvtier"]["steps"][1:]
    workload = {"docs": docs, "doc_tokens": doc_tokens, "requests": requests, "pool_tokens": pool_blocks * 32,
                "vllm_s": sum(s["s"] for s in wv), "kvtier_s": sum(s["s"] for s in wk),
                "vllm_cached_tokens": sum(s["cached"] for s in wv), "kvtier_cached_tokens": sum(s["cached"] for s in wk),
                "outputs_match": [s["outputs"] for s in wv] == [s["outputs"] for s in wk]}
    workload["speedup"] = workload["vllm_s"] / workload["kvtier_s"]
    out(f"TTFT, {size} model, vLLM on CPU (seconds; hits: median of {reps})")
    out(f"{'tokens':>6} {'cold':>7} {'cold+save':>9} {'vLLM hit':>8} {'kvtier cpu':>10} {'kvtier disk':>11} "
        f"{'kv/vLLM hit':>11} {'cold/kv':>8} outputs")
    for x in rows:
        out(f"{x['tokens']:>6} {x['cold_vllm_s']:>7.3f} {x['cold_kvtier_s']:>9.3f} {x['vllm_hit_s']:>8.3f} "
            f"{x['kvtier_cpu_hit_s']:>10.3f} {x['kvtier_disk_hit_s']:>11.3f} {x['kvtier_hit_vs_vllm_hit']:>10.2f}x "
            f"{x['speedup_vs_cold']:>7.1f}x {'same' if x['outputs_match'] else 'DIFFER'}")
    out(f"workload: {requests} requests over {docs} documents of {doc_tokens} tokens, KV pool of "
        f"{workload['pool_tokens']} tokens: vLLM prefix caching {workload['vllm_s']:.1f}s, with kvtier "
        f"{workload['kvtier_s']:.1f}s ({workload['speedup']:.1f}x); cached tokens {workload['vllm_cached_tokens']} "
        f"vs {workload['kvtier_cached_tokens']}; outputs {'same' if workload['outputs_match'] else 'DIFFER'}")
    return {"model": size, "ttft": rows, "workload": workload,
            "startup_s": {name: r["startup_s"] for name, r in runs.items()}}


def bench_arrivals_cpu(size: str = "demo", out: Callable[[str], None] = print) -> dict[str, Any]:
    """8 requests decode (128-token prompts, 64 new tokens) while 3 requests with a 1K-token cached
    prefix arrive 0.3 s apart, per ``load_mode``; see :mod:`kvtier.vllm.arrivals`."""
    from kvtier.models import SIZES, kv_bytes_per_token, make_random_llama
    from kvtier.vllm.arrivals import CPU_SCENARIO, ENGINE_CPU_SCENARIO, bench_arrivals

    model = make_random_llama(model_dir(size), size)
    engine = {k: v for k, v in DEMO_ENGINE.items() if k != "skip_tokenizer_init"} | ENGINE_CPU_SCENARIO
    disk = tempfile.mkdtemp(prefix="kvtier-bench-arrivals-")
    try:
        result = bench_arrivals(model, engine, kv_bytes_per_token(model, 4), SIZES[size]["vocab_size"],
                                ["sync", "async", "auto"], disk, out=out, **CPU_SCENARIO)
    finally:
        shutil.rmtree(disk, ignore_errors=True)
    out(f"{'mode':>12} {'ITL p50 ms':>10} {'ITL p99 ms':>10} {'TTFT p50 s':>10}")
    for mode, m in result["modes"].items():
        ttft = "" if m["ttft_p50_s"] is None else f"{m['ttft_p50_s']:.3f}"
        out(f"{mode:>12} {m['itl_p50_ms']:>10.1f} {m['itl_p99_ms']:>10.1f} {ttft:>10}")
    return {"model": size, **result}
