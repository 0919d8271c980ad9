"""Randomized equality on a GPU vLLM engine: greedy outputs with kvtier equal vLLM alone (issue 11).

The scenarios of tests/vllm/test_engine_random.py (shared prefixes, random lengths and
generation lengths, prefix-cache resets so later requests load from kvtier) on one pair of
GPU engines (vLLM alone, vLLM + kvtier) with CUDA graphs and async scheduling on, a tiny
float32 Llama (bf16 batch effects would make two runs of vLLM alone differ), chunked prefill
(128 tokens a step) and a 33-block pool (preemptions). From the second third on, every save
copy starts ~25 ms after the forward that wrote its KV (``slow_saves``: the engine finishes,
preempts and reuses blocks while saves are still to copy them); the last third also loses
20 % of the chunks loads fetch. Every scenario must match exactly.

Before them, the save fence is checked head on, twice: A's saves are held back ~0.2 s each;
A finishes, B is handed A's freed blocks and writes them; C then loads A's prefix from
kvtier. With ``KVWorker.fence_saves`` turned off (the control) C must diverge, which shows the
check catches the bug; with it on, C must match.

    python3 benchmarks/gpu_engine_random.py --scenarios 24 --out benchmarks/results/gpu_engine_random_h200.json

``--disk``: kvtier with a 4 MiB cpu tier over a disk tier written by its writer process, so
loads also come from files the child wrote while the engine ran.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path

from _common import ROOT, tiny_engine_pair

sys.path.insert(0, str(ROOT / "tests" / "vllm"))
from test_engine_random import _scenarios  # noqa: E402

ENGINE = dict(block_size=32, enable_prefix_caching=True, max_num_batched_tokens=128, max_num_seqs=16,
              num_gpu_blocks_override=33, max_model_len=1024, seed=0, enforce_eager=False,
              gpu_memory_utilization=0.3, scheduler_reserve_full_isl=False)


def fence_check(base, kv, seed: int, fence: bool) -> dict:
    """A's saves still copying when B writes A's freed blocks; C loads A's prefix from kvtier."""
    rnd = random.Random(seed)
    a = [rnd.randrange(3, 1000) for _ in range(512)]  # 16 of the pool's 32 blocks
    b = [rnd.randrange(3, 1000) for _ in range(900)]  # 29 blocks: at least 13 of them were A's
    c = a + [rnd.randrange(3, 1000) for _ in range(64)]
    kv.call("fault", faults=["slow_saves"] + ([] if fence else ["no_fence"]), args={"cycles": 400_000_000})
    before = kv.stats()["counters"]
    out = {"fence": fence, "steps": []}
    for name, prompts, mt, reset in (("A", [a], 1, True), ("B", [b], 1, False), ("C", [c], 16, True)):
        if name == "C":  # A's saves committed (after B wrote A's freed blocks), so that C loads them
            kv.call("flush")
        base.send("generate", prompts=prompts, max_tokens=mt, reset=reset)
        got = kv.generate(prompts, mt, reset=reset)
        want = base.recv()["outputs"]
        out["steps"].append({"request": name, "cached": got["cached"], "outputs_match": got["outputs"] == want})
    kv.call("fault", faults=[])
    kv.call("flush")  # C's own saves, and any still held back
    after = kv.stats()["counters"]
    out["save_fences"] = after["save_fences"] - before["save_fences"]
    out["slowed_saves"] = after["slowed_saves"] - before["slowed_saves"]
    out["c_loaded_a"] = out["steps"][2]["cached"][0] >= 512
    out["outputs_match"] = all(x["outputs_match"] for x in out["steps"])
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenarios", type=int, default=24)
    ap.add_argument("--out", default="benchmarks/results/gpu_engine_random_h200.json")
    ap.add_argument("--cpu", action="store_true", help="dry run on vLLM's CPU engine (async scheduling forced)")
    ap.add_argument("--disk", action="store_true", help="a small cpu tier over a disk tier (writer process)")
    args = ap.parse_args()
    import torch
    import vllm

    # Every hit loaded: on a GPU the cost model computes a tiny model's short prompts instead, and the
    # loads (what this checks) would not happen.
    kvtier = {"chunk_size": 64, "tiers": ["cpu"], "cpu_bytes": "256MiB", "load_policy": "always"}
    if args.disk:
        kvtier = {"chunk_size": 64, "tiers": ["cpu", "disk"], "cpu_bytes": "4MiB", "writer": "process",
                  "disk_path": tempfile.mkdtemp(prefix="kvtier-random-disk-"), "disk_bytes": "1GiB",
                  "load_policy": "always"}
    engine, base, kv, logs = tiny_engine_pair(ENGINE, kvtier, args.cpu)
    faults_from = args.scenarios - args.scenarios // 3
    slow_from = args.scenarios // 3
    result = {"command": "python3 " + " ".join(sys.argv), "vllm_version": vllm.__version__,
              "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
              "engine": engine, "kvtier_config": kvtier, "scenarios": []}
    divergent = 0
    control_caught = False
    try:
        result["fence_control"] = fence_check(base, kv, 101, fence=False)
        result["fence_check"] = fence_check(base, kv, 102, fence=True)
        control_caught = not result["fence_control"]["outputs_match"]
        divergent += not result["fence_check"]["outputs_match"]
        print("fence control (off):", json.dumps(result["fence_control"]), flush=True)
        print("fence check (on):", json.dumps(result["fence_check"]), flush=True)
        for i, prompts, mts, reset in _scenarios("gpu", args.scenarios, 5, engine["max_model_len"]):
            if i == faults_from:
                kv.call("fault", faults=["slow_saves", "lose_chunks"], args={"p": 0.2, "seed": 5})
            elif i == slow_from:
                kv.call("fault", faults=["slow_saves"])
            base.send("generate", prompts=prompts, max_tokens=mts, reset=reset)
            got = kv.generate(prompts, mts, reset=reset)
            want = base.recv()["outputs"]
            same = got["outputs"] == want
            divergent += not same
            result["scenarios"].append({"i": i, "prompt_lengths": [len(p) for p in prompts], "max_tokens": mts,
                                        "reset": reset, "losses_injected": i >= faults_from,
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
    result["fence_control_diverged"] = control_caught
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result.get(k) for k in ("vllm_version", "gpu", "divergent", "error")}))
    if "kvtier" in result:
        print(json.dumps(result["kvtier"]["counters"]), json.dumps(result["kvtier"]["worker"]))
    if not args.cpu and not control_caught:  # on CPU saves are synchronous: nothing to catch
        print("the fence control did not diverge: the check does not show the fence matters", flush=True)
        return 1
    return 0 if divergent == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
