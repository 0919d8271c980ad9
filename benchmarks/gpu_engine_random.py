"""Randomized equality on a GPU vLLM engine: greedy outputs with kvtier equal vLLM alone (issue 11).

The scenarios of tests/vllm/test_engine_random.py (shared prefixes, random lengths and
generation lengths, prefix-cache resets so later requests load from kvtier) on one pair of
GPU engines (vLLM alone, vLLM + kvtier) with CUDA graphs and async scheduling on, a tiny
float32 Llama (bf16 batch effects would make two runs of vLLM alone differ), chunked prefill
(128 tokens a step) and a 33-block pool (preemptions). The last third of the scenarios lose
20 % of the chunks loads fetch. Every scenario must match exactly.

    python3 benchmarks/gpu_engine_random.py --scenarios 24 --out benchmarks/results/gpu_engine_random_h200.json
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
    args = ap.parse_args()
    import torch
    import vllm

    engine, base, kv, logs = tiny_engine_pair(ENGINE, {"chunk_size": 64, "tiers": ["cpu"], "cpu_bytes": "256MiB"},
                                              args.cpu)
    faults_from = args.scenarios - args.scenarios // 3
    result = {"command": "python3 " + " ".join(sys.argv), "vllm_version": vllm.__version__,
              "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
              "engine": engine, "scenarios": []}
    divergent = 0
    try:
        for i, prompts, mts, reset in _scenarios("gpu", args.scenarios, 5, engine["max_model_len"]):
            if i == faults_from:
                kv.call("fault", faults=["lose_chunks"], args={"p": 0.2, "seed": 5})
            base.send("generate", prompts=prompts, max_tokens=mts, reset=reset)
            got = kv.generate(prompts, mts, reset=reset)
            want = base.recv()["outputs"]
            same = got["outputs"] == want
            divergent += not same
            result["scenarios"].append({"i": i, "prompt_lengths": [len(p) for p in prompts], "max_tokens": mts,
                                        "reset": reset, "losses_injected": i >= faults_from,
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
    return 0 if divergent == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
