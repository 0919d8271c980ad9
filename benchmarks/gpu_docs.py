"""A long-document workload on a GPU vLLM: is every kvtier hit a win against recomputing? (issue 25)

16 documents of 8,192 tokens (Llama-3.1-8B shape, dummy bf16 weights: 1 GiB of KV each, 16 GiB in
all); vLLM's GPU KV cache capped at 40,960 tokens (``num_gpu_blocks_override``), so its own prefix
cache must evict. Each configuration runs in its own engine process (kvtier.vllm.phases):

1. every document with question 1, one at a time (cold: kvtier saves);
2. every document with question 2, one at a time: TTFT of each;
3. all documents with question 3 at once: wall time, 16 greedy tokens each.

Configurations (``--configs``): ``vllm_alone``; ``vllm_apc`` (vLLM alone with a GPU cache that holds
every document: pass 3 reuses KV its prefix cache computed one document at a time, as kvtier's does;
the control for pass 3's outputs, since bf16 results depend on the batch's shape); ``kvtier_cpu`` (cpu
tier of 24 GiB); ``kvtier_cpu_nosave`` (the same as a decode instance, ``kv_role: kv_consumer``: kvtier
present, nothing saved, so pass 1 shows what its hooks cost without the saves); ``kvtier_default``
(no settings but ``disk_path``: cpu + disk, cpu size from the host's memory); ``kvtier_default_dropped``
(the same, page cache dropped before pass 2); ``kvtier_default_settled`` (the same, pass 2 only once
the writes behind pass 1 are done: what they cost pass 2); ``kvtier_cpu4g_disk`` and ``..._dropped`` (a 4 GiB cpu tier:
most documents come from the disk); ``vllm_offloading`` (vLLM's OffloadingConnector, 24 GiB);
``lmcache_cpu`` (LMCache 0.5.3 through vLLM's LMCacheConnectorV1: local_cpu of kvtier_cpu's size, chunks of
256 tokens) and ``lmcache_cpu4g_disk`` / ``..._dropped`` (local_cpu 4 GiB + local_disk in the same directory
with kvtier's default disk budget, as kvtier_cpu4g_disk); LMCache's settings are in
benchmarks/gpu_lmcache/phase.py, its kit in benchmarks/gpu_lmcache/prepare.sh. Where LMCache cannot be
imported, its configurations record the exact error (``skipped``) and the others run.

The JSON's ``rows``: one per configuration and pass, with ``config``, ``pass``, ``ttft_mean_s``,
``wall_s``, ``tokens_from_kvtier`` (kvtier's loaded tokens in that pass), ``tokens_from_connector`` (the
LMCache runs: vLLM's ``external_prefix_cache_hits``, the tokens LMCache supplied), ``outputs_match`` (first tokens
of passes 1-2, all 16 tokens of pass 3, against ``vllm_alone``; for pass 3 also ``outputs_differ_at``,
``margins_where_differ`` and ``differ_from_vllm_apc``: where outputs part, with both sides' margins there),
and kvtier's cost model's view
(``predicted_load_s``, ``predicted_saved_s``, ``cost_skipped_tokens``, ``promoted_chunks``, ``fetch_s``).
Results of earlier calls are kept in ``$GPU_VLLM_STATE/docs.json`` so that configurations can run in
several device calls (``--configs a,b``) and the last call writes them all.

    python3 benchmarks/gpu_docs.py --configs vllm_alone,kvtier_cpu,kvtier_default
    python3 benchmarks/gpu_docs.py --cpu     # dry run: tiny model on vLLM's CPU engine
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

from kvtier.vllm.phases import metric_key, parse_metric_key, run_phase

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_lmcache import phase as lmcache  # noqa: E402
from gpu_vllm import LLAMA_8B  # noqa: E402

STATE = Path(os.environ.get("GPU_VLLM_STATE", "/tmp/kvtier-gpu-vllm"))
ALL = ["vllm_alone", "vllm_apc", "kvtier_cpu", "kvtier_cpu_nosave", "kvtier_default", "kvtier_default_dropped",
       "kvtier_default_settled",
       "kvtier_cpu4g_disk",
       "kvtier_cpu4g_disk_dropped", "vllm_offloading", "lmcache_cpu", "lmcache_cpu4g_disk",
       "lmcache_cpu4g_disk_dropped"]
COUNTERS = {"tokens_from_kvtier": "loaded_tokens", "predicted_load_s": "predicted_load_seconds",
            "predicted_saved_s": "predicted_saved_seconds", "cost_skipped_tokens": "cost_skipped_tokens",
            "promoted_chunks": "promoted_chunks", "fetch_s": "fetch_seconds"}
CONNECTOR_HITS = "vllm:external_prefix_cache_hits"  # in the LMCache runs' metrics (gpu_lmcache/phase.py)


def setup(cpu: bool) -> dict:
    if cpu:
        from kvtier.models import SIZES, make_random_llama

        model = make_random_llama(STATE / "tiny", "tiny")
        return dict(model=model, vocab=SIZES["tiny"]["vocab_size"], docs=16, doc_tokens=512, question=16,
                    engine=dict(max_model_len=1024, max_num_batched_tokens=1024, block_size=32,
                                num_gpu_blocks_override=80, disable_log_stats=False),
                    big="256MiB", small="4MiB", native=None)
    model = STATE / "llama-8b-dummy"
    model.mkdir(parents=True, exist_ok=True)
    (model / "config.json").write_text(json.dumps(LLAMA_8B))
    return dict(model=str(model), vocab=LLAMA_8B["vocab_size"], docs=16, doc_tokens=8192, question=32,
                engine=dict(load_format="dummy", dtype="bfloat16", enforce_eager=False, block_size=16,
                            max_model_len=8192 + 256, max_num_batched_tokens=8192, gpu_memory_utilization=0.85,
                            num_gpu_blocks_override=40960 // 16, disable_log_stats=False,
                            # 17 sequences at most: fewer CUDA graphs to capture, a shorter start-up
                            max_num_seqs=32),
                big="24GiB", small="4GiB", native=24.0)


def kvtier_config(name: str, s: dict, disk: Path) -> dict | None:
    if name in ("kvtier_cpu", "kvtier_cpu_nosave"):
        return {"tiers": ["cpu"], "cpu_bytes": s["big"]}
    if name.startswith("kvtier_default"):
        return {"disk_path": str(disk)}
    if name.startswith("kvtier_cpu4g_disk"):
        return {"tiers": ["cpu", "disk"], "cpu_bytes": s["small"], "disk_path": str(disk)}
    return None


def steps_for(name: str, s: dict, docs: list[list[int]], questions: list[list[list[int]]], disk: Path) -> list:
    warm = {"op": "ttft", "prompt": docs[0][:64]}
    out: list[dict] = [warm, {"op": "metrics"}]
    for p, q in enumerate(questions[:2]):
        if p == 1 and name.endswith("_dropped"):
            out.append({"op": "drop_page_cache", "path": str(disk)})
        if p == 1 and name.endswith("_settled"):
            out.append({"op": "settle", "path": str(disk)})
        out += [{"op": "ttft", "prompt": d + q[i], "pass": p + 1} for i, d in enumerate(docs)]
        out.append({"op": "metrics"})
    out.append({"op": "generate", "prompts": [d + questions[2][i] for i, d in enumerate(docs)], "max_tokens": 16,
                "pass": 3, "margins": True})
    out.append({"op": "metrics"})
    return out


def run_config(name: str, s: dict, docs, questions) -> dict:
    disk = STATE / "docs-disk"
    shutil.rmtree(disk, ignore_errors=True)
    engine = dict(s["engine"])
    if name == "vllm_apc":  # every document and its questions fit: nothing is evicted
        per_doc = s["doc_tokens"] + 4 * s["question"] + 64
        engine["num_gpu_blocks_override"] = s["docs"] * per_doc // engine["block_size"]
    if name == "vllm_offloading":
        if s["native"] is None:
            return {"skipped": "vLLM's offloading runs on GPUs only"}
        engine |= {"kv_offloading_size": s["native"], "kv_offloading_backend": "native"}
    t = time.time()
    steps = steps_for(name, s, docs, questions, disk)
    if name.startswith("lmcache"):
        result = lmcache.run_phase(s["model"], steps, lmcache.settings(name, s["big"], s["small"], disk), engine)
    else:
        # kvtier_cpu_nosave: a decode instance's role (loads, never saves): what pass 1 costs
        # with kvtier present but nothing saved, beside kvtier_cpu's pass 1 (issue 25's goal 1.0x).
        role = "kv_consumer" if name == "kvtier_cpu_nosave" else "kv_both"
        result = run_phase(s["model"], steps, kvtier_config(name, s, disk), engine, kv_role=role)
    if "skipped" in result:
        print(f"{name} skipped: {result['skipped']}", flush=True)
    else:
        print(f"{name}: {time.time() - t:.0f} s (start-up {result['startup_s']:.0f} s)", flush=True)
    shutil.rmtree(disk, ignore_errors=True)
    return result


def step_host(before: dict, after: dict, side: str) -> dict | None:
    """kvtier's host time per step on the engine's thread (``vllm:kvtier_step_host_seconds``,
    issue 28) between two metrics snapshots: steps, mean, and the bucket bound holding the p99."""
    base = "vllm:kvtier_step_host_seconds"

    def grew(key: str) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    count = grew(metric_key(f"{base}_count", {"side": side}))
    if count <= 0:
        return None
    bounds = sorted((float(labels["le"]), k) for k in after for name, labels in [parse_metric_key(k)]
                    if name == f"{base}_bucket" and labels.get("side") == side and "le" in labels)
    p99 = next((bound for bound, k in bounds if grew(k) >= 0.99 * count), None)
    return {"steps": int(count), "mean_s": grew(metric_key(f"{base}_sum", {"side": side})) / count,
            "p99_at_most_s": p99}


def summarize(name: str, result: dict, base: dict | None, control: dict | None = None) -> list[dict]:
    """Rows of one configuration, one per pass, against ``base`` (vLLM alone) and, for pass 3's outputs,
    ``control`` (``vllm_apc``: vLLM alone reusing its own prefix cache, the same reuse as a hit)."""
    if "skipped" in result:
        return [{"config": name, "pass": None, "skipped": result["skipped"]}]
    steps = result["steps"]
    metrics = [x["values"] for x in steps if x["op"] == "metrics"]
    dropped = [x for x in steps if x["op"] in ("drop_page_cache", "settle")]

    def tokens_of(r: dict, p: int) -> list:
        if p == 3:
            return _generate_step(r)["outputs"]
        return [x["tokens"] for x in r["steps"] if x.get("pass") == p]

    rows = []
    for p in (1, 2, 3):
        mine = [x for x in steps if x.get("pass") == p]
        row = {"config": name, "pass": p,
               "ttft_mean_s": statistics.mean(x["s"] for x in mine) if p < 3 else None,
               "ttft_max_s": max(x["s"] for x in mine) if p < 3 else None,
               "ttft_s": [round(x["s"], 4) for x in mine] if p < 3 else None,
               "wall_s": sum(x["s"] for x in mine),
               "cached_tokens": sum(x["cached"] or 0 for x in mine)}
        before, after = metrics[p - 1], metrics[p]
        for key, counter in COUNTERS.items():
            full = next((k for k in after if k.startswith(f"vllm:kvtier_{counter}")), None)
            row[key] = (after[full] - before.get(full, 0.0)) if full else None
        full = next((k for k in after if k.startswith(CONNECTOR_HITS)), None)
        row["tokens_from_connector"] = (after[full] - before.get(full, 0.0)) if full else None
        row["step_host"] = {side: step_host(before, after, side) for side in ("scheduler", "worker")}
        row["outputs_match"] = None if base is None else tokens_of(result, p) == tokens_of(base, p)
        if p == 3 and base is not None:
            row["outputs_differ_at"], row["margins_where_differ"] = _pass3_differences(result, base)
        if p == 3 and control is not None:
            row["differ_from_vllm_apc"] = _pass3_differences(result, control)[1]
        if p == 2 and dropped:
            row["page_cache"] = {k: v for k, v in dropped[0].items() if k != "op"}
        rows.append(row)
    return rows


def _pass3_differences(result: dict, other: dict) -> tuple[list, list | None]:
    """Where pass 3's outputs part from ``other``'s: [document, first position that differs] for each
    that does, and [document, position, my margin, other's margin] there (each side's log-probability
    lead of its token over the runner-up: ~0 for a near tie; None where margins were not recorded)."""
    mine, theirs = _generate_step(result), _generate_step(other)
    differ_at = [[i, next((j for j, (a, b) in enumerate(zip(x, y)) if a != b), len(x))]
                 for i, (x, y) in enumerate(zip(mine["outputs"], theirs["outputs"])) if x != y]
    m, t = mine.get("margins"), theirs.get("margins")
    if not (m and t):
        return differ_at, None
    return differ_at, [[i, j, m[i][j], t[i][j]] for i, j in differ_at if j < min(len(m[i]), len(t[i]))]


def _generate_step(result: dict) -> dict:
    """Pass 3's step: all documents at once (its outputs, and margins where recorded)."""
    return next(x for x in result["steps"] if x.get("op") == "generate")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default=",".join(ALL))
    ap.add_argument("--cpu", action="store_true", help="dry run: tiny model, vLLM's CPU engine")
    ap.add_argument("--fresh", action="store_true", help="forget results of earlier calls")
    ap.add_argument("--out", default="benchmarks/results/gpu_docs_h200.json")
    args = ap.parse_args()
    STATE.mkdir(parents=True, exist_ok=True)
    s = setup(args.cpu)
    rnd = random.Random(25)
    docs = [[rnd.randrange(10, s["vocab"] - 10) for _ in range(s["doc_tokens"])] for _ in range(s["docs"])]
    questions = [[[rnd.randrange(10, s["vocab"] - 10) for _ in range(s["question"])] for _ in docs]
                 for _ in range(3)]
    saved = STATE / ("docs_cpu.json" if args.cpu else "docs.json")
    results = {} if args.fresh or not saved.exists() else json.loads(saved.read_text())
    for name in args.configs.split(","):
        if name not in ALL:
            ap.error(f"unknown configuration {name!r}; choose from {', '.join(ALL)}")
        try:
            results[name] = run_config(name, s, docs, questions)
        except RuntimeError as e:  # one engine failing must not lose the others' figures
            print(f"{name} failed: {e}", flush=True)
            results[name] = {"skipped": f"failed: {str(e)[-2000:]}"}
        saved.write_text(json.dumps(results))
    base, control = results.get("vllm_alone"), results.get("vllm_apc")
    rows = [r for name in ALL if name in results for r in summarize(name, results[name], base, control)]
    import torch
    import vllm

    out = {"command": "python3 benchmarks/gpu_docs.py " + " ".join(sys.argv[1:]),
           "vllm_version": vllm.__version__,
           "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (CPU dry run)",
           "host": {"cpus": os.cpu_count(), "mem_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")},
           "workload": {k: s[k] for k in ("docs", "doc_tokens", "question")}, "engine": s["engine"],
           "configs": {n: kvtier_config(n, s, STATE / "docs-disk")
                       or lmcache.settings(n, s["big"], s["small"], STATE / "docs-disk") for n in ALL},
           "startup_s": {n: r.get("startup_s") for n, r in results.items()}, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    keys = ["config", "pass", "ttft_mean_s", "wall_s", "tokens_from_kvtier", "tokens_from_connector",
            "cost_skipped_tokens",
            "predicted_load_s", "predicted_saved_s", "outputs_match"]
    print(" ".join(f"{k:>18}" for k in keys))
    for r in rows:
        print(" ".join(f"{r.get(k):>18.4f}" if isinstance(r.get(k), float) else f"{str(r.get(k)):>18}" for k in keys))
    return 0


if __name__ == "__main__":
    sys.exit(main())
