"""kvtier inside a GPU vLLM engine: TTFT cold / vLLM prefix-cache hit / kvtier hits / vLLM's own
CPU offload hit, against the link and disk limits measured in the same run (issue 11).

A Llama-3.1-8B-shaped model with dummy weights (bf16), default engine settings (CUDA graphs,
torch.compile, async scheduling), vLLM's default multi-process engine, prompts of token ids.
Each engine runs in its own process (kvtier.vllm.phases); a figure is the median of --reps
runs, each on a prompt vLLM's prefix cache does not hold (``reset_prefix_cache`` before it):

- ``cold_s``: vLLM alone; ``apc_hit_s``: the same prompt again (vLLM's prefix cache);
- ``cold_kvtier_s``: with kvtier (cpu + disk tiers) saving; ``kvtier_cpu_hit_s``: after
  ``reset_prefix_cache()``, from the cpu tier; ``kvtier_disk_hit_s``: in a restarted engine
  (page cache dropped first when the machine lets us), from the disk tier;
- ``native_offload_hit_s``: vLLM's own CPU offload (``kv_offloading_size``), after a reset;
- ``link_limit_s``: KV bytes / pinned host->device ``copy_`` bandwidth, measured here;
  ``disk_limit_s``: KV bytes / sequential read bandwidth of kvtier's chunk files, measured here;
- ``outputs_match``: 16 greedy tokens of the first prompt, equal in every configuration;
  ``outputs_diverge_at``: for each configuration whose tokens differ from vLLM alone's, the first
  position that differs (0: the first token, computed from the loaded KV, is already another;
  a late position on one configuration alone is more likely a near-tie of the logits);
  ``hit_first_token_equal``: per configuration, for each prompt, whether the first token of its hit
  equals that of its cold run (every prompt of every length, not only the generated one);
- ``cold_kvtier_cpu_only_s``, ``kvtier_cpu_hit_cpu_only_s``: the kvtier figures again in an engine
  with the cpu tier only, where no disk tier writes chunks behind the requests;
- ``cold_kvtier_nosave_s`` (``--nosave``): the cold runs again with kvtier present and saving nothing
  (vLLM's ``kv_role: kv_consumer``): what kvtier's hooks cost a prefill, apart from its saves;
- ``cold_lmcache_s``, ``lmcache_cpu_hit_s`` (issue 30): the same steps as kvtier's with LMCache 0.5.3
  (vLLM's LMCacheConnectorV1, local_cpu of kvtier's cpu_bytes, chunks of 256 tokens; settings in
  benchmarks/gpu_lmcache/phase.py), from ``--part lmcache`` run before part 2; None where that part
  did not run, and ``lmcache`` says why where LMCache could not (the exact error); ``lmcache.log``: what
  LMCache's retrieves moved (tokens, GB, ms, from its own log lines).
- ``hits_faster_than_link``: the connector hits timed below ``link_limit_s``, which cannot have loaded
  their whole prompt over the link (on the H100, LMCache's "hits" were timed at vLLM's own prefix-cache
  speed even after a reset vLLM agreed to).

    python3 benchmarks/gpu_vllm.py --part 1 && python3 benchmarks/gpu_vllm.py --part 2
    (LMCache: --part lmcache between the two, after its kit: benchmarks/gpu_lmcache/prepare.sh)
    (--part all: both in one call; --cpu: dry run with the tiny model on vLLM's CPU engine)
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

from kvtier.models import kv_bytes_per_token
from kvtier.vllm.phases import drop_page_cache_now, run_phase, trace_engines_to

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_lmcache import phase as lmcache  # noqa: E402

LLAMA_8B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
            "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
            "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256, "rms_norm_eps": 1e-5,
            "rope_theta": 500000.0, "max_position_embeddings": 131072, "torch_dtype": "bfloat16",
            "tie_word_embeddings": False, "hidden_act": "silu", "bos_token_id": 128000,
            "eos_token_id": 128001}
# Not KVTIER_*: the engine reads those as kvtier settings.
STATE = Path(os.environ.get("GPU_VLLM_STATE", "/tmp/kvtier-gpu-vllm"))


def _setup(cpu: bool) -> tuple[str, dict, dict, int, list[int]]:
    """(model dir, engine kwargs, kvtier config, vocab, lengths)."""
    if cpu:
        from kvtier.models import SIZES, make_random_llama

        model = make_random_llama(STATE / "tiny", "tiny")
        engine = dict(max_model_len=4096, max_num_batched_tokens=1024, block_size=32)
        return model, engine, {"cpu_bytes": "1GiB", "disk_bytes": "4GiB"}, SIZES["tiny"]["vocab_size"], [512, 2048]
    model = STATE / "llama-8b-dummy"
    model.mkdir(parents=True, exist_ok=True)
    (model / "config.json").write_text(json.dumps(LLAMA_8B))
    engine = dict(load_format="dummy", dtype="bfloat16", enforce_eager=False, block_size=16,
                  max_model_len=32768 + 64, max_num_batched_tokens=8192, gpu_memory_utilization=0.85)
    return str(model), engine, {"cpu_bytes": "24GiB", "disk_bytes": "48GiB"}, LLAMA_8B["vocab_size"], \
        [2048, 8192, 32768]


def _prompts(vocab: int, lengths: list[int], reps: int) -> dict[int, list[list[int]]]:
    rnd = random.Random(11)
    return {n: [[rnd.randrange(10, vocab - 10) for _ in range(n)] for _ in range(reps)] for n in lengths}




def _ttfts(result: dict, skip: int = 0) -> list[dict]:
    return [s for s in result["steps"] if s["op"] == "ttft"][skip:]


def _saving_steps(prompts: dict[int, list[list[int]]]) -> list[dict]:
    """Per length: every prompt cold (the connector saves), then every one again after a reset (a hit
    from the connector's cpu copy); then the 16-token generations."""
    reset = {"op": "reset_prefix_cache"}
    steps = [{"op": "ttft", "prompt": prompts[min(prompts)][0][:64]}]
    for n, ps in prompts.items():
        steps += [step for p in ps for step in (reset, {"op": "ttft", "prompt": p})]  # cold, saving
        steps += [step for p in ps for step in (reset, {"op": "ttft", "prompt": p})]  # cpu hits
    gen = [{"op": "generate", "prompts": [prompts[n][0]], "max_tokens": 16} for n in prompts]
    return steps + [s for g in gen for s in (reset, g)]


def part_lmcache(model, engine, kv, prompts, v1_runner: bool = False) -> dict:
    """LMCache (local_cpu of kvtier's cpu_bytes) through the steps kvtier runs in part 1. ``v1_runner``:
    on vLLM's V1 model runner (``VLLM_USE_V2_MODEL_RUNNER=0``), where the connector's ``start_load_kv``
    always gets the step's attention metadata (on the V2 runner a full-CUDA-graph step gives it none,
    and LMCache 0.5.3 then loads nothing: docs/vllm.md)."""
    env = lmcache.settings("lmcache_cpu", kv["cpu_bytes"], kv["cpu_bytes"], STATE / "lmcache-disk")
    if v1_runner:
        env["VLLM_USE_V2_MODEL_RUNNER"] = "0"
    t = time.time()
    try:
        result = lmcache.run_phase(model, _saving_steps(prompts), env, engine)
    except RuntimeError as e:  # the engine failed: its log's tail is the answer
        result = {"skipped": f"failed: {str(e)[-2000:]}"}
    if "skipped" in result:
        print(f"lmcache skipped: {result['skipped']}", flush=True)
    else:
        print(f"lmcache: {time.time() - t:.0f} s (start-up {result['startup_s']:.0f} s)", flush=True)
    return {**result, "settings": env}


def part1(model, engine, kv, prompts, reps, cpu_only: bool = True, nosave: bool = False,
          trace: str | None = None) -> dict:
    """vLLM alone (cold, APC hit) and kvtier (cold with saves, cpu-tier hit); with ``nosave`` kvtier's
    cold runs again as a consumer, which saves nothing. ``trace``: a directory for the spans of both
    kvtier engines (``KVTIER_TRACE``, trace_kvtier.jsonl and trace_nosave.jsonl)."""
    reset = {"op": "reset_prefix_cache"}
    warm = {"op": "ttft", "prompt": prompts[min(prompts)][0][:64]}
    gen = [{"op": "generate", "prompts": [prompts[n][0]], "max_tokens": 16} for n in prompts]
    base_steps = [warm]
    for n, ps in prompts.items():
        for p in ps:
            base_steps += [reset, {"op": "ttft", "prompt": p}, {"op": "ttft", "prompt": p}]
    base_steps += [reset] + gen
    kv_steps = _saving_steps(prompts)
    t = time.time()
    base = run_phase(model, base_steps, None, engine)
    print(f"vllm alone: {time.time() - t:.0f} s (start-up {base['startup_s']:.0f} s)", flush=True)
    t = time.time()
    trace_engines_to(trace, "kvtier")
    kvr = run_phase(model, kv_steps, kv, engine)
    print(f"kvtier: {time.time() - t:.0f} s (start-up {kvr['startup_s']:.0f} s)", flush=True)
    nosave_run = None
    if nosave:  # a fresh disk directory: a consumer would load what the run above saved
        t = time.time()
        fresh = kv["disk_path"] + "-nosave"
        shutil.rmtree(fresh, ignore_errors=True)
        trace_engines_to(trace, "nosave")
        nosave_run = run_phase(model, kv_steps, kv | {"disk_path": fresh}, engine, kv_role="kv_consumer")
        print(f"kvtier, saving nothing: {time.time() - t:.0f} s", flush=True)
    trace_engines_to(None, "")
    if not cpu_only:
        return {"base": base, "kvtier": kvr, "kvtier_cpu_only": None, "kvtier_nosave": nosave_run}
    # The same with the cpu tier only: no disk tier writing chunks behind the requests, to
    # measure what that costs the engine.
    t = time.time()
    cpu_only = run_phase(model, kv_steps, {k: v for k, v in kv.items() if not k.startswith("disk")} |
                         {"tiers": ["cpu"]}, engine)
    print(f"kvtier, cpu tier only: {time.time() - t:.0f} s", flush=True)
    return {"base": base, "kvtier": kvr, "kvtier_cpu_only": cpu_only, "kvtier_nosave": nosave_run}


def part2(model, engine, kv, prompts, reps, native_gib: float | None) -> dict:
    """kvtier after a restart (disk-tier hits) and vLLM's own CPU offload."""
    reset = {"op": "reset_prefix_cache"}
    warm = {"op": "ttft", "prompt": prompts[min(prompts)][0][:64]}
    gen = [{"op": "generate", "prompts": [prompts[n][0]], "max_tokens": 16} for n in prompts]
    dropped = drop_page_cache_now()
    disk_steps = [warm] + [s for n, ps in prompts.items() for p in ps for s in (reset, {"op": "ttft", "prompt": p})]
    disk_steps += [s for g in gen for s in (reset, g)]
    t = time.time()
    restart = run_phase(model, disk_steps, kv, engine)
    print(f"kvtier restart: {time.time() - t:.0f} s", flush=True)
    if native_gib is None:  # vLLM's CPU offload runs on GPUs only
        return {"restart": restart, "native": None, "page_cache_dropped": dropped}
    native_steps = [warm]
    for n, ps in prompts.items():
        native_steps += [s for p in ps for s in (reset, {"op": "ttft", "prompt": p})]  # cold, offloading
        native_steps += [s for p in ps for s in (reset, {"op": "ttft", "prompt": p})]  # hits
    native_steps += [s for g in gen for s in (reset, g)]
    t = time.time()
    native = run_phase(model, native_steps, None, {**engine, "kv_offloading_size": native_gib,
                                                    "kv_offloading_backend": "native"})
    print(f"vLLM native offload: {time.time() - t:.0f} s", flush=True)
    return {"restart": restart, "native": native, "page_cache_dropped": dropped}


def link_and_disk(per_token: int, disk_path: str) -> dict:
    """Pinned host->device copy bandwidth and kvtier chunk-file read bandwidth (bytes/s)."""
    import torch

    out: dict = {}
    if torch.cuda.is_available():
        n = 1 << 30
        src = torch.empty(n, dtype=torch.uint8, pin_memory=True)
        dst = torch.empty(n, dtype=torch.uint8, device="cuda")
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        times = []
        for _ in range(5):
            t = time.perf_counter()
            dst.copy_(src, non_blocking=True)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        out["h2d_bytes_per_s"] = n / statistics.median(times)
    files = sorted(p for p in Path(disk_path).rglob("*") if p.is_file())
    out["page_cache_dropped_for_disk"] = drop_page_cache_now()
    total, t = 0, time.perf_counter()
    for p in files[:4096]:
        with open(p, "rb", buffering=0) as f:
            while chunk := f.read(16 << 20):
                total += len(chunk)
    dt = time.perf_counter() - t
    out["disk_read_bytes"] = total
    out["disk_bytes_per_s"] = total / dt if dt > 0 and total else None
    out["kv_bytes_per_token"] = per_token
    return out


def _of_length(ttfts: list[dict], i: int, per_length: int) -> list[dict]:
    """The timed steps of the ``i``-th prompt length: each part times ``per_length`` steps per length
    (``reps`` cold then ``reps`` hits, or ``reps`` hits alone), lengths in order."""
    return ttfts[i * per_length:(i + 1) * per_length]


def rows(p1: dict, p2: dict, limits: dict, prompts: dict, reps: int, lm: dict | None = None) -> list[dict]:
    med = lambda xs: statistics.median(xs) if xs else None  # noqa: E731
    lm = lm if lm and "steps" in lm else None
    lmc = _ttfts(lm, 1) if lm else []
    base = _ttfts(p1["base"], 1)
    kvr = _ttfts(p1["kvtier"], 1)
    cpu_only = _ttfts(p1["kvtier_cpu_only"], 1) if p1.get("kvtier_cpu_only") else []
    nosave = _ttfts(p1["kvtier_nosave"], 1) if p1.get("kvtier_nosave") else []
    restart = _ttfts(p2["restart"], 1)
    native = _ttfts(p2["native"], 1) if p2["native"] else []
    gens = {name: [s for s in r["steps"] if s["op"] == "generate"]
            for name, r in (("vllm", p1["base"]), ("kvtier_cpu", p1["kvtier"]), ("kvtier_disk", p2["restart"]),
                            ("native", p2["native"]), ("kvtier_cpu_only", p1.get("kvtier_cpu_only")),
                            ("lmcache", lm))
            if r is not None}
    out = []
    for i, n in enumerate(prompts):
        b, k, nat, c, m = (_of_length(t, i, 2 * reps) for t in (base, kvr, native, cpu_only, lmc))
        d = _of_length(restart, i, reps)
        ns = _of_length(nosave, i, 2 * reps)
        kv_bytes = n * limits["kv_bytes_per_token"]
        outs = {name: g[i]["outputs"][0] for name, g in gens.items()}
        row = {"tokens": n, "kv_bytes": kv_bytes,
               "cold_s": med([s["s"] for s in b[0::2]]), "apc_hit_s": med([s["s"] for s in b[1::2]]),
               "cold_kvtier_s": med([s["s"] for s in k[:reps]]),
               "kvtier_cpu_hit_s": med([s["s"] for s in k[reps:]]),
               "kvtier_disk_hit_s": med([s["s"] for s in d]),
               "native_offload_hit_s": med([s["s"] for s in nat[reps:]]),
               "cold_kvtier_cpu_only_s": med([s["s"] for s in c[:reps]]),
               "kvtier_cpu_hit_cpu_only_s": med([s["s"] for s in c[reps:]]),
               "cold_kvtier_nosave_s": med([s["s"] for s in ns[:reps]]),
               "cold_lmcache_s": med([s["s"] for s in m[:reps]]),
               "lmcache_cpu_hit_s": med([s["s"] for s in m[reps:]]),
               "link_limit_s": kv_bytes / limits["h2d_bytes_per_s"] if limits.get("h2d_bytes_per_s") else None,
               "disk_limit_s": kv_bytes / limits["disk_bytes_per_s"] if limits.get("disk_bytes_per_s") else None,
               "cached_tokens": {"apc": [s["cached"] for s in b[1::2]], "kvtier_cpu": [s["cached"] for s in k[reps:]],
                                 "kvtier_disk": [s["cached"] for s in d],
                                 "native": [s["cached"] for s in nat[reps:]],
                                 "lmcache_cpu": [s["cached"] for s in m[reps:]]},
               "runs_s": {"cold": [s["s"] for s in b[0::2]], "apc": [s["s"] for s in b[1::2]],
                          "cold_kvtier": [s["s"] for s in k[:reps]], "kvtier_cpu": [s["s"] for s in k[reps:]],
                          "kvtier_disk": [s["s"] for s in d], "native": [s["s"] for s in nat[reps:]],
                          "cold_kvtier_cpu_only": [s["s"] for s in c[:reps]],
                          "kvtier_cpu_cpu_only": [s["s"] for s in c[reps:]],
                          "cold_lmcache": [s["s"] for s in m[:reps]], "lmcache_cpu": [s["s"] for s in m[reps:]]},
               "outputs": outs,
               "outputs_match": all(o == outs["vllm"] for o in outs.values())}
        row["outputs_diverge_at"] = diverge_at(outs)
        row["hit_first_token_equal"] = {
            name: got for name, got in (("apc", first_tokens_equal(b[0::2], b[1::2])),
                                        ("kvtier_cpu", first_tokens_equal(k[:reps], k[reps:])),
                                        ("kvtier_cpu_only", first_tokens_equal(c[:reps], c[reps:])),
                                        ("native", first_tokens_equal(nat[:reps], nat[reps:])),
                                        ("lmcache_cpu", first_tokens_equal(m[:reps], m[reps:]))) if got is not None}
        row["hits_faster_than_link"] = faster_than_link(row)
        out.append(row)
    return out


def lmcache_check(lm: dict, prompts: dict, reps: int) -> dict:
    """What one LMCache run did per length: its cold and hit TTFT (medians), whether each hit's first
    token equals its cold run's, and how many retrieves its log shows (``--part lmcache_v1``)."""
    if "steps" not in lm:
        return {"skipped": lm.get("skipped")}
    ttfts, out = _ttfts(lm, 1), {}
    for i, n in enumerate(prompts):
        m = _of_length(ttfts, i, 2 * reps)
        out[n] = {"cold_s": statistics.median(s["s"] for s in m[:reps]),
                  "hit_s": statistics.median(s["s"] for s in m[reps:]),
                  "cached": [s["cached"] for s in m[reps:]],
                  "first_token_equal": first_tokens_equal(m[:reps], m[reps:])}
    return {"settings": lm.get("settings"), "by_length": out,
            "retrieves": (lm.get("lmcache_log") or {}).get("retrieves", {}).get("count")}


def first_tokens_equal(colds: list[dict], hits: list[dict]) -> list[bool] | None:
    """Per prompt, whether its hit's first token equals its cold run's (the hit's token is computed
    over the loaded KV, so it shows a wrong load on every prompt, not only the generated one); None
    where there are no hits or the steps carry no tokens."""
    if not hits or any("tokens" not in s for s in colds + hits):
        return None
    return [h["tokens"][:1] == c["tokens"][:1] for c, h in zip(colds, hits)]


def diverge_at(outputs: dict[str, list[int] | None]) -> dict[str, int]:
    """Each configuration whose greedy tokens differ from ``outputs["vllm"]``, with the first position
    that differs (a shorter answer differs where it ends)."""
    want = outputs["vllm"]
    return {name: next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
            for name, got in outputs.items() if got is not None and got != want}


def faster_than_link(row: dict) -> list[str]:
    """The connector hits of ``row`` timed below the time the host link needs for their bytes: such a
    hit did not load its whole prompt over the link (vLLM's own prefix cache served it, or the
    connector moved less), so it must not be read as that connector's load time."""
    link = row.get("link_limit_s")
    names = ("kvtier_cpu_hit_s", "native_offload_hit_s", "lmcache_cpu_hit_s", "kvtier_cpu_hit_cpu_only_s")
    return [] if not link else [n for n in names if row.get(n) is not None and row[n] < link]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=["1", "2", "all", "lmcache", "lmcache_v1"], default="all",
                    help="lmcache: LMCache's engine only (issue 30), kept for part 2's table; lmcache_v1: the same "
                         "on vLLM's V1 model runner, reported apart (lmcache_v1_runner)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--cpu", action="store_true", help="dry run: tiny model, vLLM's CPU engine")
    ap.add_argument("--no-cpu-only", action="store_true", help="part 1 without the cpu-tier-only engine")
    ap.add_argument("--nosave", action="store_true",
                    help="part 1 also runs kvtier's cold steps as a consumer, which saves nothing (issue 28)")
    ap.add_argument("--trace", default=None, help="part 1: a directory for kvtier's spans (KVTIER_TRACE) in its "
                    "cold runs, with and without saving")
    ap.add_argument("--out", default="benchmarks/results/gpu_vllm_h200.json")
    args = ap.parse_args()
    STATE.mkdir(parents=True, exist_ok=True)
    model, engine, kv_sizes, vocab, lengths = _setup(args.cpu)
    kv = {"tiers": ["cpu", "disk"], "writer": "auto", "disk_path": str(STATE / "disk"), **kv_sizes}
    prompts = _prompts(vocab, lengths, args.reps)
    per_token = kv_bytes_per_token(model, 4 if args.cpu else 2)  # float32 on the CPU dry run, bf16 on the GPU
    if args.part in ("1", "all"):
        p1 = part1(model, engine, kv, prompts, args.reps, not args.no_cpu_only, args.nosave, args.trace)
        p1["traced"] = bool(args.trace)
        (STATE / "part1.json").write_text(json.dumps(p1))
    if args.part == "lmcache":
        (STATE / "lmcache.json").write_text(json.dumps(part_lmcache(model, engine, kv, prompts)))
    if args.part == "lmcache_v1":
        v1 = part_lmcache(model, engine, kv, prompts, v1_runner=True)
        (STATE / "lmcache_v1.json").write_text(json.dumps(v1))
        print(json.dumps(lmcache_check(v1, prompts, args.reps)), flush=True)
    if args.part in ("2", "all"):
        p2 = part2(model, engine, kv, prompts, args.reps, None if args.cpu else 24.0)
        limits = link_and_disk(per_token, kv["disk_path"])
        p1 = json.loads((STATE / "part1.json").read_text())
        lm = json.loads((STATE / "lmcache.json").read_text()) if (STATE / "lmcache.json").exists() else None
        v1 = STATE / "lmcache_v1.json"
        v1 = lmcache_check(json.loads(v1.read_text()), prompts, args.reps) if v1.exists() else None
        import torch
        import vllm

        result = {"command": "python3 benchmarks/gpu_vllm.py " + " ".join(sys.argv[1:]),
                  "vllm_version": vllm.__version__,
                  "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (CPU dry run)",
                  "model": ("Llama-3.1-8B shape, dummy weights (kvtier.vllm.phases.use_kv_sensitive_dummy_weights)"
                            if not args.cpu else "tiny"), "engine": engine,
                  "kvtier": kv, "reps": args.reps, "limits": limits,
                  "page_cache_dropped_before_restart": p2["page_cache_dropped"],
                  "kvtier_cold_runs_traced": p1.get("traced", False),
                  "startup_s": {"vllm": p1["base"]["startup_s"], "kvtier": p1["kvtier"]["startup_s"],
                                "kvtier_restart": p2["restart"]["startup_s"],
                                "native": p2["native"]["startup_s"] if p2["native"] else None,
                                "lmcache": lm.get("startup_s") if lm else None},
                  "lmcache": None if lm is None else {"settings": lm.get("settings"), "skipped": lm.get("skipped"),
                                                      "log": lm.get("lmcache_log")},
                  "lmcache_v1_runner": v1,
                  "startup_log": {name: run.get("startup_lines") for name, run in (
                      ("vllm", p1["base"]), ("kvtier", p1["kvtier"]), ("kvtier_nosave", p1.get("kvtier_nosave")),
                      ("kvtier_restart", p2["restart"]), ("native", p2["native"])) if run},
                  "rows": rows(p1, p2, limits, prompts, args.reps, lm)}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
        keys = ["tokens", "cold_s", "cold_kvtier_s", "apc_hit_s", "kvtier_cpu_hit_s", "kvtier_disk_hit_s",
                "native_offload_hit_s", "link_limit_s", "disk_limit_s", "cold_kvtier_nosave_s",
                "cold_kvtier_cpu_only_s", "kvtier_cpu_hit_cpu_only_s", "cold_lmcache_s", "lmcache_cpu_hit_s",
                "outputs_match"]
        print(" ".join(f"{k:>20}" for k in keys))
        for r in result["rows"]:
            print(" ".join(f"{r[k]:>20.4f}" if isinstance(r[k], float) else f"{str(r[k]):>20}" for k in keys))
            if r["outputs_diverge_at"]:
                print(f"  {r['tokens']} tokens: outputs differ from vLLM alone's at {r['outputs_diverge_at']}")
            if r["hits_faster_than_link"]:
                print(f"  {r['tokens']} tokens: faster than the link allows, not a load: {r['hits_faster_than_link']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
