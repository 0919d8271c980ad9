"""Randomized equality on a GPU vLLM engine: greedy outputs with kvtier equal vLLM alone (issue 11).

The scenarios of tests/vllm/test_engine_random.py (shared prefixes, random lengths and
generation lengths, prefix-cache resets so later requests load from kvtier) on one pair of
GPU engines (vLLM alone, vLLM + kvtier) with CUDA graphs and async scheduling on, a tiny
float32 Llama (bf16 batch effects would make two runs of vLLM alone differ), chunked prefill
(128 tokens a step) and a 33-block pool (preemptions). From the second third on, every save
copy starts ~25 ms after the forward that wrote its KV (``slow_saves``: the engine finishes,
preempts and reuses blocks while saves are still to copy them); the last third also loses
20 % of the chunks loads fetch. Every scenario must match exactly.

``--no-fence`` is the control: slow saves with ``KVWorker.fence_saves`` turned off, the bug the
fence prevents. Its scenarios are expected to diverge (it exits 0 when some do).

    python3 benchmarks/gpu_engine_random.py --scenarios 24 --out benchmarks/results/gpu_engine_random_h200.json
    python3 benchmarks/gpu_engine_random.py --no-fence --scenarios 8 --out benchmarks/results/gpu_engine_random_no_fence_h200.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from _common import ROOT, tiny_engine_pair

sys.path.insert(0, str(ROOT / "tests" / "vllm"))
from test_engine_random import _scenarios  # noqa: E402

ENGINE = dict(block_size=32, enable_prefix_caching=True, max_num_batched_tokens=128, max_num_seqs=16,
              num_gpu_blocks_override=33, max_model_len=1024, seed=0, enforce_eager=False,
              gpu_memory_utilization=0.3, scheduler_reserve_full_isl=False)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenarios", type=int, default=24)
    ap.add_argument("--out", default="benchmarks/results/gpu_engine_random_h200.json")
    ap.add_argument("--cpu", action="store_true", help="dry run on vLLM's CPU engine (async scheduling forced)")
    ap.add_argument("--no-fence", action="store_true", help="the control: slow saves, no fence; expected to diverge")
    args = ap.parse_args()
    import torch
    import vllm

    engine, base, kv, logs = tiny_engine_pair(ENGINE, {"chunk_size": 64, "tiers": ["cpu"], "cpu_bytes": "256MiB"},
                                              args.cpu)
    faults_from = args.scenarios - args.scenarios // 3
    slow_from = 0 if args.no_fence else args.scenarios // 3
    result = {"command": "python3 " + " ".join(sys.argv), "vllm_version": vllm.__version__,
              "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
              "engine": engine, "scenarios": []}
    divergent = 0
    try:
        for i, prompts, mts, reset in _scenarios("gpu", args.scenarios, 5, engine["max_model_len"]):
            if args.no_fence and i == 0:
                kv.call("fault", faults=["slow_saves", "no_fence"])
            elif i == faults_from:
                kv.call("fault", faults=["slow_saves", "lose_chunks"], args={"p": 0.2, "seed": 5})
            elif i == slow_from:
                kv.call("fault", faults=["slow_saves"])
            base.send("generate", prompts=prompts, max_tokens=mts, reset=reset)
            got = kv.generate(prompts, mts, reset=reset)
            want = base.recv()["outputs"]
            same = got["outputs"] == want
            divergent += not same
            result["scenarios"].append({"i": i, "prompt_lengths": [len(p) for p in prompts], "max_tokens": mts,
                                        "reset": reset, "losses_injected": i >= faults_from and not args.no_fence,
                                        "slow_saves": i >= slow_from,
                                        "cached": got["cached"], "outputs_match": same})
        st = kv.stats()
        result["kvtier"] = {"worker": st["worker"], "counters": st["counters"], "store": st["store"]}
    except Exception as e:
        result["error"] = f"{type(e).__name__}: {e}"
        divergent += 1
    finally:
        base.close()
        kv.close()
    result["divergent"] = divergent
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result.get(k) for k in ("vllm_version", "gpu", "divergent", "error")}))
    if "kvtier" in result:
        print(json.dumps(result["kvtier"]["counters"]), json.dumps(result["kvtier"]["worker"]))
    if args.no_fence:
        result["control"] = "no_fence: expected to diverge"
        Path(args.out).write_text(json.dumps(result, indent=1))
        return 0 if "error" not in result and any(not x["outputs_match"] for x in result["scenarios"]) else 1
    return 0 if divergent == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
