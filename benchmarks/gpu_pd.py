"""Prefill/decode disaggregation through kvtier against one engine of the same memory (issue 27.1).

Two configurations, each a set of vLLM OpenAI servers (``python3 -m vllm.entrypoints.openai.api_server``)
measured over HTTP with streamed requests:

- ``single``: one vLLM engine alone with ``2 x --mem`` of the GPU's memory (no kvtier);
- ``pd``: one ``kvtier serve``, a prefill engine (``kv_role: kv_producer``) and a decode engine
  (``kv_role: kv_consumer``) at ``--mem`` each, both clients of the server, ``kvtier proxy`` in front.

Workload: ``background`` requests (short prompts, long outputs) start together and decode; while they
do, ``arrivals`` long prompts (short outputs) arrive every ``interval`` seconds. Reported per
configuration: ITL p50/p99 of the background requests' tokens (the decode stall long prefills
cause), TTFT p50/p99 of the arrivals, output throughput, and whether every output equals the
``single`` run's (greedy, ``ignore_eos``).

Then, for ``pd`` only, the decode instance's own TTFT goal: for ``probes`` new long prompts, the
prompt is prefilled on the prefill instance (max_tokens=1), then sent to the decode instance (TTFT:
it loads the prompt's KV from kvtier), then sent to it again (TTFT of a hit in vLLM's own prefix
cache, "APC"). Goal: decode TTFT <= APC TTFT + 1.1 x link time, the link time being the prompt's KV
bytes at the host-to-GPU copy speed measured here (pinned memory, 1 GiB).

Results of earlier calls are kept in ``$GPU_VLLM_STATE/pd.json`` so the configurations can run in
separate device calls; each call writes the JSON with all of them.

    python3 benchmarks/gpu_pd.py --configs single --out benchmarks/results/gpu_pd_h200.json
    python3 benchmarks/gpu_pd.py --configs pd --out benchmarks/results/gpu_pd_h200.json
    python3 benchmarks/gpu_pd.py --cpu --out /tmp/gpu_pd_cpu.json   # dry run: tiny model, vLLM's CPU engine
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_vllm import LLAMA_8B  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STATE = Path(os.environ.get("GPU_VLLM_STATE", "/tmp/kvtier-gpu-vllm"))
CONFIGS = ["single", "pd"]


def setup(cpu: bool) -> dict:
    """Model (random weights, a word tokenizer: token i is the word ``w<i>``), workload, engine flags."""
    from kvtier.models import SIZES, make_random_llama, write_word_tokenizer

    if cpu:
        model = make_random_llama(STATE / "pd-tiny", "tiny")
        write_word_tokenizer(model, SIZES["tiny"]["vocab_size"])
        return dict(model=model, vocab=SIZES["tiny"]["vocab_size"], cpu=True,
                    background=4, background_prompt=64, background_tokens=400,
                    arrivals=4, arrival_prompt=700, arrival_tokens=8, interval=0.5, probes=2,
                    flags="--dtype float32 --enforce-eager --max-model-len 1024 --block-size 32 "
                          "--max-num-batched-tokens 256",
                    mem=None, chunk_size=64, server_bytes="256MiB")
    model = STATE / "llama-8b-dummy-words"
    model.mkdir(parents=True, exist_ok=True)
    (model / "config.json").write_text(json.dumps(LLAMA_8B | {"bos_token_id": 1, "eos_token_id": 2}))
    if not (model / "tokenizer.json").exists():
        write_word_tokenizer(model, LLAMA_8B["vocab_size"])
    return dict(model=str(model), vocab=LLAMA_8B["vocab_size"], cpu=False,
                background=32, background_prompt=1024, background_tokens=1024,
                arrivals=16, arrival_prompt=16384, arrival_tokens=32, interval=1.0, probes=4,
                flags="--load-format dummy --dtype bfloat16 --block-size 16 --max-model-len 17408 "
                      "--max-num-batched-tokens 8192",
                mem=0.4, chunk_size=256, server_bytes="64GiB")


# ------------------------------------------------------------------ processes
class Proc:
    """A command in its own process group, its output in ``log``; stopped with SIGINT, then SIGKILL."""

    def __init__(self, cmd: str, log: Path, env: dict | None = None) -> None:
        self.cmd, self.log = cmd, log
        self.proc = subprocess.Popen(["bash", "-c", cmd], cwd=ROOT, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                                     env=dict(os.environ, **(env or {})), start_new_session=True)

    def wait_http(self, url: str, timeout_s: float = 900.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.cmd[:80]}... exited:\n{self.log.read_text()[-3000:]}")
            try:
                urllib.request.urlopen(url, timeout=2)
                return
            except OSError:
                time.sleep(1)
        raise RuntimeError(f"{url} not up in {timeout_s:.0f} s:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        for sig, wait in ((signal.SIGINT, 120), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.proc.pid, sig)
                self.proc.wait(wait)
                return
            except ProcessLookupError:
                return
            except subprocess.TimeoutExpired:
                continue


def free_port() -> int:
    from kvtier.local_redis import free_port as fp

    return fp()


def vllm_cmd(s: dict, port: int, mem: float | None, kv: dict | None) -> str:
    cmd = (f"{sys.executable} -m vllm.entrypoints.openai.api_server --model {s['model']} --host 127.0.0.1 "
           f"--port {port} {s['flags']} --no-enable-log-requests")
    if mem is not None:
        cmd += f" --gpu-memory-utilization {mem}"
    if kv is not None:
        cmd += f" --kv-transfer-config '{json.dumps(kv)}'"
    return cmd


def metrics(url: str) -> dict[str, float]:
    """kvtier's and vLLM's prefix-cache counters on a server's /metrics, summed over labels."""
    text = urllib.request.urlopen(url + "/metrics", timeout=30).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(("vllm:kvtier_", "vllm:prefix_cache", "vllm:num_preemptions")) and " " in line:
            name = line.split("{")[0].split(" ")[0]
            try:
                out[name] = out.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
            except ValueError:
                pass
    return out


# ------------------------------------------------------------------ client
async def stream(session, url: str, model: str, prompt: str, max_tokens: int, t0: float) -> dict[str, Any]:
    """One streamed completion: send time, token times (s from t0) and text."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True}
    sent = time.perf_counter() - t0
    times, text = [], []
    async with session.post(url + "/v1/completions", json=body) as r:
        if r.status != 200:
            raise RuntimeError(f"{url}: HTTP {r.status}: {(await r.text())[:500]}")
        prefill_s = r.headers.get("X-Kvtier-Prefill-Seconds")  # kvtier proxy: its prefill leg
        buf = b""
        async for part in r.content.iter_any():
            buf += part
            while b"\n\n" in buf:
                event, buf = buf.split(b"\n\n", 1)
                line = event.decode().strip()
                if not line.startswith("data: {"):
                    continue
                piece = json.loads(line[6:])["choices"][0].get("text", "")
                if piece:
                    times.append(time.perf_counter() - t0)
                    text.append(piece)
    return {"sent": sent, "times": times, "text": "".join(text),
            "prefill_s": None if prefill_s is None else float(prefill_s)}


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


async def workload(url: str, s: dict, prompts: dict) -> dict[str, Any]:
    """Background requests decode; long prompts arrive meanwhile. Per-request timings and texts."""
    import aiohttp

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3600)) as session:
        t0 = time.perf_counter()
        bg = [asyncio.create_task(stream(session, url, s["model"], p, s["background_tokens"], t0))
              for p in prompts["background"]]
        await asyncio.sleep(2 * s["interval"])  # the background requests are decoding
        arrivals = []
        for p in prompts["arrivals"]:
            arrivals.append(asyncio.create_task(stream(session, url, s["model"], p, s["arrival_tokens"], t0)))
            await asyncio.sleep(s["interval"])
        bg_out, arr_out = await asyncio.gather(*bg), await asyncio.gather(*arrivals)
        wall = time.perf_counter() - t0
    # ITL of the background requests while the arrivals came in (from the first arrival's send)
    first = min(a["sent"] for a in arr_out) if arr_out else 0.0
    itl = [b - a for r in bg_out for a, b in zip(r["times"], r["times"][1:]) if a >= first]
    ttft = [r["times"][0] - r["sent"] for r in arr_out if r["times"]]
    # Through the proxy: TTFT = its prefill leg + the decode instance's own TTFT
    legs = [r["prefill_s"] for r in arr_out if r["prefill_s"] is not None]
    tokens = sum(len(r["times"]) for r in bg_out + arr_out)
    return {"wall_s": wall, "output_tokens": tokens, "throughput_tok_s": tokens / wall,
            "itl_p50_s": _pct(itl, 50), "itl_p99_s": _pct(itl, 99), "itl_max_s": max(itl, default=None),
            "itl_samples": len(itl),
            "ttft_p50_s": _pct(ttft, 50), "ttft_p99_s": _pct(ttft, 99), "ttft_s": ttft,
            "prefill_leg_p50_s": _pct(legs, 50), "prefill_leg_p99_s": _pct(legs, 99),
            "texts": {"background": [r["text"] for r in bg_out], "arrivals": [r["text"] for r in arr_out]}}


async def decode_ttft(prefill: str, decode: str, s: dict, prompts: list[str]) -> list[dict[str, float]]:
    """Per probe: the decode instance's TTFT after the prefill instance computed the prompt (a kvtier
    load), and again once the prompt is in the decode instance's own prefix cache (an APC hit)."""
    import aiohttp

    out = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3600)) as session:
        for p in prompts:
            async with session.post(prefill + "/v1/completions", json={"model": s["model"], "prompt": p,
                                                                         "max_tokens": 1, "temperature": 0}) as r:
                await r.read()
            row = {}
            for name in ("kvtier_load", "apc_hit"):
                t0 = time.perf_counter()
                got = await stream(session, decode, s["model"], p, 2, t0)
                row[f"{name}_ttft_s"] = got["times"][0] - got["sent"]
            out.append(row)
    return out


def h2d_gbps() -> float | None:
    """Pinned host-to-GPU copy speed (GB/s, 1 GiB, best of 5); None without a GPU."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    src = torch.empty(1 << 30, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty_like(src, device="cuda")
    best = float("inf")
    for _ in range(5):
        torch.cuda.synchronize()
        t = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    del src, dst
    torch.cuda.empty_cache()
    return (1 << 30) / best / 1e9


# ------------------------------------------------------------------ configurations
def run_config(name: str, s: dict, prompts: dict, logs: Path) -> dict[str, Any]:
    procs: list[Proc] = []
    env = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"} if s["cpu"] else {}
    sock_dir = tempfile.mkdtemp(prefix="kvpd-", dir="/tmp")
    try:
        t = time.time()
        if name == "single":
            port = free_port()
            mem = None if s["mem"] is None else 2 * s["mem"]
            procs.append(Proc(vllm_cmd(s, port, mem, None), logs / "single.log", env))
            front = f"http://127.0.0.1:{port}"
            procs[0].wait_http(front + "/health")
            servers = {"single": front}
        else:
            address = f"ipc://{sock_dir}/s.sock"
            serve = Proc(f"{sys.executable} -m kvtier.cli serve --address {address} --tiers cpu "
                         f"--cpu-bytes {s['server_bytes']} --chunk-size {s['chunk_size']} --log-level WARNING",
                         logs / "kvserve.log")
            procs.append(serve)
            from kvtier.server.server import ping

            deadline = time.monotonic() + 120
            while not ping(address, 0.5):
                if serve.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"kvtier serve did not start:\n{serve.log.read_text()[-2000:]}")
            ports = [free_port() for _ in range(3)]
            servers = {}
            for role, port in (("prefill", ports[0]), ("decode", ports[1])):
                # The module path too: the device's vLLM finds kvtier on PYTHONPATH, without the plugin
                # entry point that a pip install registers ("Unsupported connector type" otherwise).
                kv = {"kv_connector": "KVTierConnector", "kv_connector_module_path": "kvtier.vllm",
                      "kv_role": "kv_producer" if role == "prefill" else "kv_consumer",
                      "kv_connector_extra_config": {"server": address, "chunk_size": s["chunk_size"]}}
                procs.append(Proc(vllm_cmd(s, port, s["mem"], kv), logs / f"{role}.log", env))
                servers[role] = f"http://127.0.0.1:{port}"
                # One engine at a time: two engines profiling GPU memory at once misjudge what is free.
                procs[-1].wait_http(servers[role] + "/health")
            procs.append(Proc(f"{sys.executable} -m kvtier.cli proxy --prefill {servers['prefill']} "
                              f"--decode {servers['decode']} --port {ports[2]} --log-level WARNING", logs / "proxy.log"))
            front = f"http://127.0.0.1:{ports[2]}"
            procs[-1].wait_http(front + "/health", 60)
        startup = time.time() - t
        # Warm-up: one short request through the front (compiles, fills nothing that matters)
        asyncio.run(workload(front, s | {"background": 1, "background_tokens": 8, "arrivals": 0},
                             {"background": [prompts["warm"]], "arrivals": []}))
        before = {k: metrics(u) for k, u in servers.items()}
        result = asyncio.run(workload(front, s, prompts))
        result["startup_s"] = startup
        result["metrics"] = {k: {m: v - before[k].get(m, 0.0) for m, v in metrics(u).items()}
                             for k, u in servers.items()}
        if name == "pd":
            result["decode_ttft"] = asyncio.run(decode_ttft(servers["prefill"], servers["decode"], s,
                                                            prompts["probes"]))
        return result
    finally:
        for p in reversed(procs):
            p.stop()
        shutil.rmtree(sock_dir, ignore_errors=True)


def make_prompts(s: dict) -> dict[str, Any]:
    rnd = random.Random(27)

    def text(n: int) -> str:
        return " ".join(f"w{rnd.randrange(3, s['vocab'] - 3)}" for _ in range(n))

    return {"warm": text(32), "background": [text(s["background_prompt"]) for _ in range(s["background"])],
            "arrivals": [text(s["arrival_prompt"]) for _ in range(s["arrivals"])],
            "probes": [text(s["arrival_prompt"]) for _ in range(s["probes"])]}


def summarize(results: dict, s: dict) -> dict[str, Any]:
    from kvtier.models import kv_bytes_per_token

    base, pd = results.get("single"), results.get("pd")
    rows = {}
    for name, r in results.items():
        if "skipped" in r:
            rows[name] = {"skipped": r["skipped"]}
            continue
        rows[name] = {k: r[k] for k in ("wall_s", "output_tokens", "throughput_tok_s", "itl_p50_s", "itl_p99_s",
                                        "itl_max_s", "itl_samples", "ttft_p50_s", "ttft_p99_s", "prefill_leg_p50_s",
                                        "prefill_leg_p99_s", "startup_s")}
        rows[name]["metrics"] = r["metrics"]
        if base is not None and "texts" in base and name != "single":
            same = [a == b for k in ("background", "arrivals") for a, b in zip(r["texts"][k], base["texts"][k])]
            rows[name]["outputs_identical"] = all(same)
            rows[name]["outputs_identical_count"] = f"{sum(same)}/{len(same)}"
    goals: dict[str, Any] = {}
    if pd is not None and "decode_ttft" in pd:
        gbps = h2d_gbps()
        kv_bytes = s["arrival_prompt"] * kv_bytes_per_token(s["model"], 4 if s["cpu"] else 2)
        link_s = None if gbps is None else kv_bytes / (gbps * 1e9)
        probes = pd["decode_ttft"]
        goals["decode_ttft"] = {
            "h2d_gbps": gbps, "prompt_kv_bytes": kv_bytes, "link_s": link_s, "probes": probes,
            "met": None if link_s is None else all(p["kvtier_load_ttft_s"] <= p["apc_hit_ttft_s"] + 1.1 * link_s
                                                   for p in probes)}
        if base is not None and "itl_p99_s" in base:
            ratio = pd["itl_p99_s"] / base["itl_p99_s"] if pd["itl_p99_s"] and base["itl_p99_s"] else None
            goals["decode_itl_p99_ratio"] = ratio
            goals["decode_itl_p99_met"] = None if ratio is None else ratio <= 0.5
    return {"rows": rows, "goals": goals}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--cpu", action="store_true", help="dry run: tiny model, vLLM's CPU engine")
    ap.add_argument("--fresh", action="store_true", help="forget results of earlier calls")
    ap.add_argument("--out", default="benchmarks/results/gpu_pd_h200.json")
    args = ap.parse_args()
    STATE.mkdir(parents=True, exist_ok=True)
    s = setup(args.cpu)
    prompts = make_prompts(s)
    saved = STATE / ("pd_cpu.json" if args.cpu else "pd.json")
    results = {} if args.fresh or not saved.exists() else json.loads(saved.read_text())
    logs = STATE / "pd-logs"
    logs.mkdir(exist_ok=True)
    for name in args.configs.split(","):
        if name not in CONFIGS:
            ap.error(f"unknown configuration {name!r}; choose from {', '.join(CONFIGS)}")
        t = time.time()
        try:
            results[name] = run_config(name, s, prompts, logs)
        except RuntimeError as e:  # one configuration failing must not lose the other's figures
            print(f"{name} failed: {e}", flush=True)
            results[name] = {"skipped": f"failed: {str(e)[-2000:]}"}
        print(f"{name}: {time.time() - t:.0f} s", flush=True)
        saved.write_text(json.dumps(results))
    import vllm

    try:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (CPU dry run)"
    except ImportError:
        gpu = "unknown"
    out = {"command": "python3 benchmarks/gpu_pd.py " + " ".join(sys.argv[1:]), "vllm_version": vllm.__version__,
           "gpu": gpu, "host": {"cpus": os.cpu_count()},
           "workload": {k: s[k] for k in ("background", "background_prompt", "background_tokens", "arrivals",
                                          "arrival_prompt", "arrival_tokens", "interval", "probes")},
           "engine_flags": s["flags"], "mem_per_pd_engine": s["mem"], "chunk_size": s["chunk_size"],
           **summarize(results, s)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    keys = ["wall_s", "throughput_tok_s", "itl_p50_s", "itl_p99_s", "ttft_p50_s", "ttft_p99_s", "outputs_identical"]
    print(f"{'config':>8} " + " ".join(f"{k:>17}" for k in keys))
    for name, r in out["rows"].items():
        print(f"{name:>8} " + " ".join(f"{r.get(k):>17.4f}" if isinstance(r.get(k), float) else f"{str(r.get(k)):>17}"
                                      for k in keys))
    print("goals:", json.dumps(out["goals"], indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
