"""Run a vLLM engine in a fresh process and time what it does (for `kvtier demo` and `bench vllm`).

Each phase is one engine process, so "after an engine restart" is a real restart: nothing
survives but what kvtier put on disk. The parent sends a JSON spec; the child starts vLLM
(its default multi-process engine), runs the steps and prints one JSON line of results.

Steps:
- ``{"op": "ttft", "prompt": [ids]}``: time of one request generating one token (its TTFT).
- ``{"op": "generate", "prompts": [[ids]], "max_tokens": n}``: greedy outputs and wall time.
- ``{"op": "reset_prefix_cache"}``: empty vLLM's own prefix cache (kvtier keeps its copy).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

MARK = "@@KVTIER-PHASE@@"

DEMO_ENGINE = dict(enforce_eager=True, dtype="float32", block_size=32, enable_prefix_caching=True,
                   max_model_len=8192, max_num_batched_tokens=2048, skip_tokenizer_init=True, seed=0)


def run_phase(model: str, steps: list[dict[str, Any]], kvtier: dict[str, Any] | None,
              engine: dict[str, Any] | None = None, timeout: float = 1200.0) -> dict[str, Any]:
    """Start an engine (with kvtier when ``kvtier`` is a config dict), run ``steps``, stop it."""
    spec = {"model": model, "steps": steps, "kvtier": kvtier, "engine": {**DEMO_ENGINE, **(engine or {})}}
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    proc = subprocess.run([sys.executable, "-m", "kvtier.vllm.phases"], input=json.dumps(spec), text=True,
                          capture_output=True, env=env, timeout=timeout)
    for line in proc.stdout.splitlines():
        if line.startswith(MARK):
            return json.loads(line[len(MARK):])
    raise RuntimeError(f"engine phase failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")


def _child(spec: dict[str, Any]) -> dict[str, Any]:
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig
    from vllm.inputs import TokensPrompt

    kw = dict(spec["engine"])
    if spec["kvtier"] is not None:
        kw["kv_transfer_config"] = KVTransferConfig(
            kv_connector="KVTierConnector", kv_connector_module_path="kvtier.vllm", kv_role="kv_both",
            kv_connector_extra_config=spec["kvtier"])
    t0 = time.perf_counter()
    llm = LLM(model=spec["model"], **kw)
    results: dict[str, Any] = {"startup_s": time.perf_counter() - t0, "steps": []}
    one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    for step in spec["steps"]:
        op = step["op"]
        if op == "ttft":
            t = time.perf_counter()
            (out,) = llm.generate([TokensPrompt(prompt_token_ids=step["prompt"])], one, use_tqdm=False)
            results["steps"].append({"op": op, "s": time.perf_counter() - t, "cached": out.num_cached_tokens,
                                     "tokens": list(out.outputs[0].token_ids)})
        elif op == "generate":
            sp = SamplingParams(max_tokens=step["max_tokens"], temperature=0.0, ignore_eos=True)
            t = time.perf_counter()
            outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in step["prompts"]], sp, use_tqdm=False)
            results["steps"].append({"op": op, "s": time.perf_counter() - t,
                                     "cached": sum(o.num_cached_tokens or 0 for o in outs),
                                     "prompt_tokens": sum(len(p) for p in step["prompts"]),
                                     "outputs": [list(o.outputs[0].token_ids) for o in outs]})
        elif op == "reset_prefix_cache":
            llm.reset_prefix_cache()
            results["steps"].append({"op": op})
        else:
            raise ValueError(f"unknown step {op!r}")
    return results


if __name__ == "__main__":
    result = _child(json.loads(sys.stdin.read()))
    sys.stdout.write(MARK + json.dumps(result) + "\n")
    sys.stdout.flush()
    os._exit(0)  # skip slow interpreter teardown of the engine's threads
