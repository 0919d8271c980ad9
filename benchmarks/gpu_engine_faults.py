"""Chunks lost between lookup and load, in a GPU vLLM engine with async scheduling (issue 16).

The workload of the report: a tiny float32 Llama (hidden 128, 2 layers, 4 heads, 2 KV heads,
head 32, vocab 1024, weights N(0, 0.2)), block_size 32, max_model_len 1024, 128 tokens a
step, 16 sequences, 33 GPU blocks (preemptions), 16 prompts over 3 shared documents,
64 greedy tokens each, the batch sent three times; kvtier with its defaults, 15 % of the
chunks the worker fetches turned into misses (with noise written into the failed blocks).
Each seed: vLLM alone once, then kvtier three rounds; every round must equal vLLM alone.
Engines run in child processes (tests/vllm/engine_proc.py), CUDA graphs on.

``--connector lmcache`` runs the same workload and the same loss with LMCache 0.5.3 (issue 30:
local_cpu, its 256-token chunks as kvtier's): the lost chunks are misses of its storage manager,
its own path for a chunk found at lookup and unreadable at load (engine_proc._lossy_lmcache).

    python3 benchmarks/gpu_engine_faults.py --out benchmarks/results/gpu_engine_faults_h200.json
    python3 benchmarks/gpu_engine_faults.py --connector lmcache \
        --out benchmarks/results/gpu_engine_faults_lmcache_h200.json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from _common import ROOT, tiny_engine_pair

sys.path.insert(0, str(ROOT / "tests" / "vllm"))
from test_engine_async import _workload  # noqa: E402

ENGINE = dict(block_size=32, enable_prefix_caching=True, max_num_batched_tokens=128, max_num_seqs=16,
              num_gpu_blocks_override=33, max_model_len=1024, seed=0, enforce_eager=False,
              gpu_memory_utilization=0.3)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--p", type=float, default=0.15, help="share of fetched chunks lost")
    ap.add_argument("--out", default="benchmarks/results/gpu_engine_faults_h200.json")
    ap.add_argument("--sync-loads", action="store_true",
                    help="control: kvtier's former synchronous loads under async scheduling (expected to crash)")
    ap.add_argument("--cpu", action="store_true", help="dry run on vLLM's CPU engine (async scheduling forced)")
    ap.add_argument("--connector", choices=["kvtier", "lmcache"], default="kvtier")
    ap.add_argument("--policy", choices=["fail", "recompute"], default=None,
                    help="LMCache's engine: vLLM's kv_load_failure_policy (default: vLLM's own, 'fail'; kvtier sets "
                         "'recompute' itself)")
    args = ap.parse_args()
    import torch
    import vllm

    lmcache = None
    if args.connector == "lmcache":
        from gpu_lmcache import phase as lmcache_phase

        error = None if args.cpu else lmcache_phase.ready()  # its compiled ops need CUDA
        if error is not None:
            Path(args.out).write_text(json.dumps({"command": "python3 " + " ".join(sys.argv), "skipped": error}))
            print("LMCache cannot run here:", error)
            return 1
        lmcache = lmcache_phase.QUIET | lmcache_phase.settings("lmcache_cpu", "2GiB", "2GiB", Path("/unused"))
    policy = {"kv_transfer_config": {"kv_load_failure_policy": args.policy}} if lmcache and args.policy else None
    # kvtier loads every hit: on the H100 (lease of 2026-12-06) its cost model computed this tiny model's
    # prompts instead, no chunk was fetched and nothing was lost (the run then fails: it tested nothing).
    kvtier = {"load_policy": "always"} if lmcache is None else None
    engine, base, kv, logs = tiny_engine_pair(ENGINE, kvtier, args.cpu,
                                              sync_loads=args.sync_loads, lmcache=lmcache, connector_engine=policy)
    result = {"command": "python3 " + " ".join(sys.argv), "vllm_version": vllm.__version__,
              "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
              "connector": args.connector, "lmcache_settings": lmcache, "policy": args.policy,
              "engine": engine, "kvtier": kvtier, "loss_p": args.p, "sync_loads": args.sync_loads, "seeds": []}
    ok = True
    try:
        for seed in [int(s) for s in args.seeds.split(",")]:
            prompts = _workload(seed)
            want = base.generate(prompts, 64, reset=True)["outputs"]
            before = kv.stats()
            kv.call("fault", faults=["lose_chunks"], args={"p": args.p, "seed": seed})
            rounds = []
            for _ in range(args.rounds):
                got = kv.generate(prompts, 64, reset=True)
                # A request vLLM ended with an error (policy 'fail') is short; a full-length answer that
                # differs read wrong KV.
                differ = [i for i, (o, w) in enumerate(zip(got["outputs"], want)) if o != w]
                rounds.append({"outputs_match": got["outputs"] == want, "cached_tokens": sum(got["cached"]),
                               "finish": dict(Counter(got.get("finish", []))),
                               "differ_full_length": sum(len(got["outputs"][i]) == len(want[i]) for i in differ),
                               "differ_short": sum(len(got["outputs"][i]) < len(want[i]) for i in differ)})
            kv.call("fault", faults=[])
            after = kv.stats()
            row = {"seed": seed, "rounds": rounds,
                   "chunks_lost": after["counters"]["faults_injected"] - before["counters"]["faults_injected"],
                   "loaded_tokens": after["worker"].get("loaded_tokens", 0) - before["worker"].get("loaded_tokens", 0),
                   "preemptions_total": after["counters"]["preemptions"],
                   "load_errors_total": after["store"].get("load_errors"),  # kvtier's (LMCache: None)
                   "torn_tokens_total": after["counters"].get("torn_tokens")}  # LMCache's (kvtier: None)
            ok &= all(r["outputs_match"] for r in rounds)
            result["seeds"].append(row)
            print(json.dumps(row), flush=True)
    except Exception as e:  # the engine died: that is the result
        ok = False
        result["error"] = f"{type(e).__name__}: {e}"
        print("ERROR", result["error"], flush=True)
        for name in ("base.log", "connector.log"):
            text = (logs / name).read_text(errors="replace")
            tail = [ln for ln in text.splitlines() if "Error" in ln or "assert" in ln or "Traceback" in ln][-20:]
            result[f"{name}_errors"] = tail
    finally:
        base.close()
        kv.close()
    text = (logs / "connector.log").read_text(errors="replace").splitlines()
    # The keys keep their first name (results committed before LMCache ran): the connector's log.
    result["kvtier_log_recoveries"] = [ln for ln in text if "Recovered from KV load failure" in ln][-30:]
    result["kvtier_log_connector"] = [ln for ln in text if "kvtier connector" in ln or "LMCache" in ln][:4]
    result["recoveries_total"] = sum("Recovered from KV load failure" in ln for ln in text)
    result["all_outputs_match"] = ok
    # A run that tested nothing fails too: no chunk lost, or LMCache failed to start (it then
    # recomputes everything, and the outputs match).
    result["chunks_lost_total"] = sum(row["chunks_lost"] for row in result["seeds"])
    ok &= result["chunks_lost_total"] > 0
    if lmcache is not None:
        result["lmcache_degraded"] = [ln for ln in text if any(m in ln for m in lmcache_phase.DEGRADED)][:4]
        ok &= not result["lmcache_degraded"]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print("all rounds equal vLLM alone:", ok)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
