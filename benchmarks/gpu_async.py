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
- ``native``: vLLM's own CPU offload (``kv_offloading_size``);
- ``alone``: vLLM with no connector (async scheduling on): its arrivals are computed, and what
  the engine does around an arrival without kvtier shows (the first arrival's wait, say);
- ``lmcache``: LMCache 0.5.3 through vLLM's ``LMCacheConnectorV1`` (issue 30), ``local_cpu`` of the
  same 24 GiB as ``native`` (kit: benchmarks/gpu_lmcache/prepare.sh); skipped with LMCache's
  exact error where its compiled ops do not load.

    python3 benchmarks/gpu_async.py                 # on the GPU machine
    python3 benchmarks/gpu_async.py --cpu           # dry run: tiny model on vLLM's CPU engine
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_vllm import STATE, _setup  # noqa: E402

from kvtier.models import kv_bytes_per_token  # noqa: E402
from kvtier.vllm.arrivals import CPU_SCENARIO, ENGINE_CPU_SCENARIO, bench_arrivals  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true")
    ap.add_argument("--modes", default="auto,async,sync,native")
    ap.add_argument("--trace", default=None, help="directory: kvtier's spans (KVTIER_TRACE) and every token's "
                    "time per mode, to find what delays the running requests")
    ap.add_argument("--disk", action=argparse.BooleanOptionalAction, default=True,
                    help="also arrivals whose prefix only the disk tier holds (page cache dropped)")
    ap.add_argument("--out", default="benchmarks/results/gpu_async_h200.json")
    args = ap.parse_args()
    STATE.mkdir(parents=True, exist_ok=True)
    model, engine, _, vocab, _ = _setup(args.cpu)
    if args.cpu:
        sizes = CPU_SCENARIO
        engine = engine | ENGINE_CPU_SCENARIO
        modes = [m for m in args.modes.split(",") if m != "native"]
    else:
        sizes = dict(running=32, context=1024, prefix=32768, new_tokens=256, arrivals=4, interval_s=0.5, settle_s=15.0,
                     disk_settle_s=3.0)
        modes = args.modes.split(",")
    result = {"command": "python3 benchmarks/gpu_async.py " + " ".join(sys.argv[1:])}
    others = {"alone": ({}, {})} if "alone" in modes else {}
    if "lmcache" in modes:
        from gpu_lmcache import phase as lmcache

        error = lmcache.ready()
        if error is None:
            env = lmcache.QUIET | lmcache.settings("lmcache_cpu", "24GiB", "24GiB", STATE / "lmcache-disk")
            others["lmcache"] = ({"kv_transfer_config": lmcache.CONNECTOR}, env)
        else:
            result["lmcache"] = {"skipped": error}
            modes = [m for m in modes if m != "lmcache"]
    per_token = kv_bytes_per_token(model, 4 if args.cpu else 2)  # float32 on the CPU dry run, bf16 on the GPU
    result |= bench_arrivals(model, engine, per_token, vocab, modes, STATE / "async-disk", disk=args.disk,
                             trace=args.trace, others=others, out=lambda s: print(s, flush=True), **sizes)
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
