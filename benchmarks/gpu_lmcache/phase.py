"""LMCache as a configuration of the GPU benchmarks (issue 30): its settings, and an engine child.

The child is kvtier.vllm.phases' own child (same steps, same JSON line) with vLLM 0.24's
``LMCacheConnectorV1`` as the connector instead of kvtier's, so LMCache runs exactly the workload
kvtier runs. Three things differ, all here and none in kvtier/:

- LMCache reads its settings from ``LMCACHE_*`` environment variables (LMCache 0.5.3,
  lmcache/v1/config.py): the parent puts them in the spec and the child exports them before
  vLLM starts, so the engine-core process inherits them. One engine process per configuration, so
  LMCache's process-wide config singleton never carries over.
- ``drop_page_cache`` / ``settle`` steps name *every* file under the directory (``STEP_FILES``:
  LMCache writes ``<key>.pt`` files, kvtier ``*.kvc``).
- ``metrics`` steps also ask for vLLM's own connector counters (``STEP_MARKS``:
  ``vllm:external_prefix_cache_hits``, the tokens the connector, here LMCache, supplied) and its
  prefix-cache counters.

Before the first LMCache engine, ``run_phase`` runs ``--check`` in a process of its own: it loads
LMCache's compiled ops and imports what vLLM's connector will import (LMCache's vLLM adapter). If
that fails, it prints the exact traceback and every LMCache configuration answers
``{"skipped": ...}`` without starting an engine: the benchmark records it and goes on with its other
configurations, so a device call is never lost to a missing package.

LMCache also keeps serving when its engine fails to start (it recomputes every token, "degraded
mode") or when its compiled ops do not load (it runs them in torch): the child reads LMCache's
lines in its own log (the engine core writes there too) and reports its lookups, hit tokens, what
each retrieve moved (tokens, GB, ms) and any such failure (``lmcache_log``); a degraded run is
recorded as skipped, with LMCache's message, rather than as LMCache's figures.

    python3 benchmarks/gpu_lmcache/phase.py --check    # the import check alone (no engine)
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
MARK = "@@KVTIER-PHASE@@"  # kvtier.vllm.phases.MARK: the parent reads the child's line by it
CHUNK = 256  # tokens per LMCache chunk: kvtier's default chunk_size
CONNECTOR = {"kv_connector": "LMCacheConnectorV1", "kv_role": "kv_both"}
# Not LMCache settings: no usage reports (the machine has no network); a fixed hash seed, as LMCache
# asks when it falls back to Python's hash for its chunk keys (vLLM 0.24 has no "builtin" hash to lend).
QUIET = {"LMCACHE_TRACK_USAGE": "false", "PYTHONHASHSEED": "0"}
# LMCache keeps serving when its engine fails to start (it recomputes everything) or when its compiled
# ops do not load (it runs them in torch); either would pass off vLLM alone's figures as LMCache's.
DEGRADED = ("degraded mode", "stays on the torch baseline", "Failed to initialize LMCacheManager",
            "Failed during post_init")
HITS = re.compile(r"LMCache hit tokens: (\d+)")
# The same lookup line (LMCache 0.5.3, vllm_v1_adapter.py) names what vLLM's own prefix cache already
# held and what LMCache is to load: a "hit" the prefix cache served shows there.
LOOKUP = re.compile(r"Inference Engine computed tokens: (\d+), LMCache hit tokens: (\d+), need to load: (\d+)")
# One line per retrieve (LMCache 0.5.3, cache_engine.py): what it moved, so a "hit" timed faster than
# the host link can be checked against the bytes it really loaded.
RETRIEVED = re.compile(r"Retrieved (\d+) out of (\d+) required tokens \(from (\d+) total tokens\)\. "
                       r"size: ([\d.]+) gb, cost ([\d.]+) ms")
STEP_FILES = "*"  # drop_page_cache / settle: LMCache's files
STEP_MARKS = ["prefix_cache", "kvtier", "lmcache"]  # metrics: vLLM's connector and prefix-cache counters


def gib(size: str) -> float:
    """'24GiB' / '256MiB' -> GiB as LMCache wants them (max_local_*_size are GiB floats)."""
    from kvtier.config import parse_size

    return parse_size("size", size) / 2**30


def kvtier_disk_gib() -> float:
    """kvtier's default disk budget (what kvtier_cpu4g_disk runs with), in GiB."""
    from kvtier.config import KVTierConfig

    return KVTierConfig.__dataclass_fields__["disk_bytes"].default / 2**30


def settings(name: str, big: str, small: str, disk: Path) -> dict[str, str] | None:
    """LMCache's ``LMCACHE_*`` settings for a configuration named ``lmcache_*`` (None for others).

    ``lmcache_cpu``: local_cpu with kvtier_cpu's host memory (``big``). ``lmcache_cpu4g_disk*``:
    local_cpu of ``small`` plus local_disk under ``disk`` with kvtier's default disk budget, as
    kvtier_cpu4g_disk. Everything else at LMCache's defaults (no layerwise, synchronous loading,
    only full chunks saved, as kvtier).
    """
    if not name.startswith("lmcache"):
        return None
    env = {"LMCACHE_CHUNK_SIZE": str(CHUNK), "LMCACHE_LOCAL_CPU": "True"}
    if name == "lmcache_cpu":
        env["LMCACHE_MAX_LOCAL_CPU_SIZE"] = f"{gib(big):g}"
    elif name.startswith("lmcache_cpu4g_disk"):
        env |= {"LMCACHE_MAX_LOCAL_CPU_SIZE": f"{gib(small):g}", "LMCACHE_LOCAL_DISK": f"file://{disk}/",
                "LMCACHE_MAX_LOCAL_DISK_SIZE": f"{kvtier_disk_gib():g}"}
    else:
        raise ValueError(f"unknown LMCache configuration {name!r}")
    return env


_CHECKED: list[str | None] = []  # check()'s answer, once per process


def run_phase(model: str, steps: list[dict[str, Any]], env: dict[str, str], engine: dict[str, Any],
              timeout: float | None = None) -> dict[str, Any]:
    """kvtier.vllm.phases.run_phase with LMCache as the connector (settings ``env``); ``{"skipped":
    error}`` without starting an engine where LMCache cannot run (the check runs once, in a process of
    its own, so this process never touches the GPU).

    An engine that hangs is killed after ``timeout`` (default ``$LMCACHE_PHASE_TIMEOUT_S`` or 420 s:
    one gpu_docs configuration takes ~2-3 min with start-up) and raises RuntimeError, which the
    benchmarks record as that configuration's failure, so a device call still has time for the rest."""
    if timeout is None:
        timeout = float(os.environ.get("LMCACHE_PHASE_TIMEOUT_S", "420"))
    from kvtier.vllm.phases import DEMO_ENGINE, run_engine_child

    error = ready()
    if error is not None:
        return {"skipped": error}
    steps = [s | {"files": STEP_FILES} if s["op"] in ("drop_page_cache", "settle")
             else s | {"marks": STEP_MARKS} if s["op"] == "metrics" else s for s in steps]
    spec = {"model": model, "steps": steps, "kvtier": None, "lmcache_env": env,
            "engine": {**DEMO_ENGINE, **engine, "kv_transfer_config": CONNECTOR}}
    result = run_engine_child([sys.executable, str(HERE)], spec, MARK, timeout)
    log = result.get("lmcache_log", {})
    got = log.get("retrieves") or {}
    print(f"LMCache's log: {log.get('lookups')} lookups, {log.get('hit_tokens')} hit tokens; "
          f"{got.get('count')} retrieves moved {got.get('retrieved_tokens')} tokens ({got.get('gb')} GB) "
          f"in {got.get('ms')} ms", flush=True)
    if log.get("degraded"):
        return {"skipped": "LMCache ran degraded (every token recomputed), so these would be vLLM alone's "
                           "figures:\n" + "\n".join(log["degraded"])[-2500:], "degraded_result": result}
    return result


def ready() -> str | None:
    """None where LMCache can run here, else why not: :func:`check` in a process of its own (so this
    one never touches the GPU), once per process."""
    if not _CHECKED:
        try:
            proc = subprocess.run([sys.executable, str(HERE), "--check"], capture_output=True, text=True,
                                  env={**os.environ, **QUIET}, timeout=240)
            out = (proc.stdout + proc.stderr).strip()
            print(out.splitlines()[-1] if proc.returncode == 0 and out else out, flush=True)
            _CHECKED.append(None if proc.returncode == 0 else (proc.stdout.strip() or proc.stderr.strip())[-3000:])
        except subprocess.TimeoutExpired:
            _CHECKED.append("LMCache's import check did not finish in 240 s")
            print(_CHECKED[0], flush=True)
    return _CHECKED[0]


PROBE = """import sys, importlib.util, torch
importlib.util.module_from_spec(importlib.util.spec_from_file_location("lmcache.c_ops", sys.argv[1]))
print("loads")"""


def check() -> str | None:
    """Import what the LMCache runs need; None if all is there, else the exact error.

    LMCache itself only logs a warning when its compiled ops do not load and then runs every op on
    its pure-torch fallback, which would make its figures meaningless: here that is an error, and
    the extension is loaded once more in a process of its own for the exact ImportError (not in this
    one: it is a multi-phase pybind11 module, which must not be initialized twice in a process).
    """
    try:
        import torch

        if not torch.cuda.is_available():
            return (f"no CUDA device (torch {torch.__version__}): LMCache's compiled ops and this "
                    "benchmark need the GPU")
        import lmcache
        # What vLLM's LMCacheConnectorV1 imports (use_native=False, the default).
        from lmcache.integration.vllm.vllm_v1_adapter import LMCacheConnectorV1Impl  # noqa: F401
        from lmcache.v1.platform import resolve_device_ops
        from vllm.distributed.kv_transfer.kv_connector.v1.lmcache_connector import LMCacheConnectorV1  # noqa: F401

        ops = resolve_device_ops("cuda")  # binds lmcache.c_ops' ops over the torch fallback
        # bind_native sets the compiled functions on the instance, over its torch fallback's bound methods.
        bound = [n for n, v in vars(ops).items() if type(v).__name__ == "builtin_function_or_method"]
        where = Path(lmcache.__file__).parent
        if not bound:
            so = sorted(where.glob("c_ops*.so"))
            if not so:
                return f"LMCache {lmcache.__version__}: no c_ops*.so in {where}"
            probe = subprocess.run([sys.executable, "-c", PROBE, str(so[0])], capture_output=True, text=True)
            return (f"LMCache {lmcache.__version__}: {type(ops).__name__} bound none of lmcache.c_ops' ops "
                    f"(it would run every op on its torch fallback); loading {so[0].name} alone:\n"
                    f"{(probe.stdout + probe.stderr).strip()[-2000:]}")
        print(f"lmcache {lmcache.__version__} from {where}: {type(ops).__name__} with {len(bound)} compiled "
              f"ops bound (lmcache.c_ops); torch {torch.__version__}", flush=True)
        return None
    except Exception:  # noqa: BLE001 - any failure: its exact traceback is the answer
        return traceback.format_exc()


def child(spec: dict[str, Any]) -> dict[str, Any]:
    os.environ.update(QUIET | spec.get("lmcache_env", {}))  # before vLLM starts its engine core
    from kvtier.vllm import phases

    result = phases._child(spec)
    result["lmcache_env"] = spec.get("lmcache_env", {})
    result["lmcache_log"] = read_own_log()
    return result


def read_own_log() -> dict[str, Any]:
    """What LMCache logged in this engine (its engine core writes to this process's stdout: the
    parent's log file): :func:`summarize_log` of it."""
    try:
        text = Path("/proc/self/fd/1").read_text(errors="replace")
    except OSError as e:
        return {"error": repr(e)}
    return summarize_log(text)


def summarize_log(text: str) -> dict[str, Any]:
    """The lookups LMCache answered and their hit tokens (each: what vLLM's prefix cache already held,
    LMCache's hit, what it is to load), its retrieves (tokens asked and moved, GB, ms; each in order),
    and any sign that it ran degraded."""
    lines = text.splitlines()
    hits = [int(m.group(1)) for line in lines if (m := HITS.search(line))]
    got = [(int(m.group(1)), int(m.group(2)), int(m.group(3)), float(m.group(4)), float(m.group(5)))
           for line in lines if (m := RETRIEVED.search(line))]
    looked = [{"vllm_computed": int(m.group(1)), "hit": int(m.group(2)), "need_to_load": int(m.group(3))}
              for line in lines if (m := LOOKUP.search(line))]
    degraded = []
    for i, line in enumerate(lines):
        if any(d in line for d in DEGRADED):
            degraded.append("\n".join(lines[i:i + 25]))  # the message and the traceback it carries
    retrieves = {"count": len(got), "retrieved_tokens": sum(g[0] for g in got),
                 "required_tokens": sum(g[1] for g in got), "gb": round(sum(g[3] for g in got), 4),
                 "ms": round(sum(g[4] for g in got), 3),
                 "each": [{"retrieved": g[0], "required": g[1], "prompt": g[2], "gb": g[3], "ms": g[4]}
                          for g in got[:200]]}
    return {"lookups": len(hits), "hit_tokens": sum(hits), "each_lookup": looked[:200], "retrieves": retrieves,
            "degraded": degraded[:4]}


if __name__ == "__main__":
    if sys.argv[1:] == ["--check"]:
        err = check()
        print("LMCache: ok" if err is None else f"LMCache cannot run here:\n{err}")
        sys.exit(0 if err is None else 1)
    result = child(json.loads(sys.stdin.read()))
    sys.stdout.write(MARK + json.dumps(result) + "\n")
    sys.stdout.flush()
    os._exit(0)  # skip slow interpreter teardown of the engine's threads
