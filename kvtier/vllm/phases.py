"""Run a vLLM engine in a fresh process and time what it does (for `kvtier demo` and `bench vllm`).

Each phase is one engine process, so "after an engine restart" is a real restart: nothing
survives but what kvtier put on disk. The parent sends a JSON spec; the child starts vLLM
(its default multi-process engine), runs the steps and prints one JSON line of results.

Steps:
- ``{"op": "ttft", "prompt": [ids]}``: time of one request generating one token (its TTFT).
- ``{"op": "generate", "prompts": [[ids]], "max_tokens": n}``: greedy outputs and wall time; with
  ``"margins": true``, also each output token's log-probability lead over the runner-up (``margins``:
  a near tie, where bf16 rounding alone can change the token, shows as a lead near 0).
- ``{"op": "reset_prefix_cache"}``: empty vLLM's own prefix cache (kvtier keeps its copy); waits
  until vLLM agrees (:func:`reset_prefix_cache`), ``tries`` in its result.
- ``{"op": "metrics"}``: kvtier's counters in vLLM's metrics so far (``vllm:kvtier_*``, summed over
  labels; the engine needs ``disable_log_stats=False``); ``"marks": [...]``: the metrics whose name
  holds one of these instead of "kvtier".
- ``{"op": "drop_page_cache", "path": dir}``: wait until kvtier stopped writing under ``dir``, then
  drop its files from the page cache, so reads come from the disk; ``"files": glob``: other files
  than kvtier's ``*.kvc`` (another connector's).
- ``{"op": "settle", "path": dir}``: only wait until kvtier stopped writing under ``dir`` (``"files"``
  as above).
- ``{"op": "profile_start", "prefix": name}`` / ``{"op": "profile_stop"}``: vLLM's torch profiler
  around the steps between them (the engine needs ``profiler_config``).
"""

from __future__ import annotations

import atexit
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from collections.abc import Sequence
from typing import Any

MARK = "@@KVTIER-PHASE@@"

DEMO_ENGINE = dict(enforce_eager=True, dtype="float32", block_size=32, enable_prefix_caching=True,
                   max_model_len=8192, max_num_batched_tokens=2048, skip_tokenizer_init=True, seed=0)


def drop_page_cache_now() -> bool:
    """Drop the OS page cache (root only), so that disk-tier reads come from the disk."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def _files(path: str, files: str) -> list[Path]:
    return [p for p in Path(path).rglob(files) if p.is_file()]


def wait_writes_quiet(path: str, files: str = "*.kvc", quiet_s: float = 2.0, wait_s: float = 120.0) -> dict[str, Any]:
    """Wait until the bytes of the ``files`` (kvtier's) under ``path`` stop changing (writes behind done)."""
    def size() -> int:
        return sum(p.stat().st_size for p in _files(path, files))

    t0 = time.monotonic()
    last, since = size(), time.monotonic()
    while time.monotonic() - since < quiet_s and time.monotonic() - t0 < wait_s:
        time.sleep(0.25)
        now = size()
        if now != last:
            last, since = now, time.monotonic()
    return {"bytes": last, "files": len(_files(path, files)), "waited_s": time.monotonic() - t0}


def drop_page_cache_of(path: str, files: str = "*.kvc", quiet_s: float = 2.0, wait_s: float = 120.0) -> dict[str, Any]:
    """Wait until the writes of the ``files`` (kvtier's) under ``path`` are done, then drop those
    files from the page cache (``POSIX_FADV_DONTNEED`` per file, which needs no privilege)."""
    quiet = wait_writes_quiet(path, files, quiet_s, wait_s)
    # Only kvtier's files: dropping the whole page cache also evicts the engine's own libraries,
    # whose pages then fault back in during the next requests (seen: +12 % TTFT on the H200).
    os.sync()
    for p in _files(path, files):
        try:
            fd = os.open(p, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return {"method": "fadvise", **quiet}


def metric_key(name: str, labels: dict[str, str]) -> str:
    """How :func:`kvtier_metrics` names a histogram's sample: ``NAME{k=v,...}``, labels sorted."""
    return name + "{" + ",".join(f"{k}={v}" for k, v in sorted(labels.items())) + "}"


def parse_metric_key(key: str) -> tuple[str, dict[str, str]]:
    """The name and labels of a :func:`metric_key` (a plain name has no labels)."""
    name, _, rest = key.partition("{")
    labels = dict(item.split("=", 1) for item in rest.rstrip("}").split(",") if item)
    return name, labels


def kvtier_metrics(llm: Any, marks: Sequence[str] = ("kvtier",)) -> dict[str, float]:
    """kvtier's metrics so far in this process's Prometheus registry, where the ``LLM``'s stat
    loggers keep them (``vllm:kvtier_*``; those whose name holds one of ``marks``), summed over
    engines: a counter or gauge under its name; a histogram as ``NAME_count{labels}``,
    ``NAME_sum{labels}`` and ``NAME_bucket{labels,le=X}`` (cumulative), its labels being those
    other than the engine's (e.g. ``side=worker``). Read from the registry, not through
    ``llm.get_metrics()``, which rounds counters down to integers (seconds read as 0, 1, 4)."""
    from prometheus_client import REGISTRY

    out: dict[str, float] = {}
    if getattr(getattr(llm, "llm_engine", None), "logger_manager", None) is None:
        return {"error": "this engine keeps no metrics (start it with disable_log_stats=False)"}
    for family in REGISTRY.collect():
        if not family.name.startswith("vllm:") or not any(mark in family.name for mark in marks):
            continue
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            if family.type == "histogram":
                key = metric_key(sample.name, {k: v for k, v in sample.labels.items()
                                               if k not in ("model_name", "engine")})
            else:
                key = family.name
            out[key] = out.get(key, 0.0) + float(sample.value)
    return out


def run_phase(model: str, steps: list[dict[str, Any]], kvtier: dict[str, Any] | None,
              engine: dict[str, Any] | None = None, timeout: float = 1200.0,
              kv_role: str = "kv_both") -> dict[str, Any]:
    """Start an engine (with kvtier when ``kvtier`` is a config dict, in vLLM's ``kv_role``), run
    ``steps``, stop it."""
    spec = {"model": model, "steps": steps, "kvtier": kvtier, "engine": {**DEMO_ENGINE, **(engine or {})},
            "kv_role": kv_role}
    return run_engine_child([sys.executable, "-m", "kvtier.vllm.phases"], spec, MARK, timeout)


# vLLM's INFO lines that time a part of its start-up (model load, torch.compile, CUDA graphs, ...).
_STARTUP_LINE = re.compile(r"(took|takes|finished|elapsed)\b.*?\b[0-9]+(\.[0-9]+)? ?(s|sec|secs|seconds)\b")


def run_engine_child(argv: list[str], spec: dict[str, Any], mark: str, timeout: float = 1200.0) -> dict[str, Any]:
    """Run ``argv`` (a process that starts a vLLM engine) with ``spec`` as JSON on stdin; return
    the JSON of its output line that starts with ``mark``. Whatever is left of its process group
    is killed after."""
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    # Output goes to a file, not a pipe: a pipe stays open in any engine process that
    # outlives the child, and reading it to EOF would then hang.
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=log, stderr=log, env=env, text=True,
                                start_new_session=True)
        try:
            proc.communicate(json.dumps(spec), timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        finally:
            kill_process_group(proc.pid)
        log.seek(0)
        text = log.read()
    lines = text.splitlines()
    for line in lines:
        if line.startswith(mark):
            result = json.loads(line[len(mark):])
            timed = [t for t in map(str.strip, lines) if _STARTUP_LINE.search(t)]
            if timed:  # with VLLM_LOGGING_LEVEL=INFO: where the engine's start-up went
                result["startup_lines"] = timed[:40]
            return result
    raise RuntimeError(f"engine process failed (exit {proc.returncode}):\n{text[-4000:]}")


def _margins(logprobs: list[dict] | None) -> list[float | None]:
    """Per generated token, its log-probability minus the best other token's (None: not reported)."""
    out: list[float | None] = []
    for pos in logprobs or []:
        two = _two_likeliest(pos)
        out.append(round(two[0][1] - two[1][1], 5) if len(two) > 1 else None)
    return out


def trace_engines_to(trace: str | None, name: str) -> None:
    """Engines started after this write kvtier's spans to ``trace``/trace_``name``.jsonl (None: no trace)."""
    os.environ.pop("KVTIER_TRACE", None)
    if trace:
        Path(trace).mkdir(parents=True, exist_ok=True)
        os.environ["KVTIER_TRACE"] = str(Path(trace) / f"trace_{name}.jsonl")


def kill_process_group(pgid: int) -> None:
    """SIGKILL what is left of a process group (an engine core a dead parent left behind)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def shutdown_engine(llm: Any) -> None:
    """Stop an ``LLM``'s engine-core process (multi-process mode) before the process exits.

    Skipping this and calling ``os._exit`` leaves the engine core running, orphaned,
    holding gigabytes of memory.
    """
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:  # noqa: BLE001 - best effort at exit; the caller kills the process group anyway
        pass


def _top2(out: Any) -> list[list[float]]:
    """[[token, logprob], ...] of the two likeliest first tokens (empty if not reported)."""
    lps = out.outputs[0].logprobs
    return _two_likeliest(lps[0]) if lps else []


def _two_likeliest(position: dict) -> list[list[float]]:
    """[[token, logprob], ...] of the two likeliest tokens at one generated position."""
    best = sorted(position.items(), key=lambda kv: -kv[1].logprob)[:2]
    return [[tok, lp.logprob] for tok, lp in best]


def reset_prefix_cache(llm: Any, wait_s: float = 60.0) -> int:
    """Empty the ``LLM``'s own prefix cache, for certain; returns the tries it took.

    vLLM refuses the reset (returns False, logs a warning) while any block is held, and a connector
    may hold a finished request's blocks until its save is done (LMCache's engine was refused so).
    A benchmark that went on would time vLLM's own prefix-cache hits as the connector's (the H100 run
    of 6f17f61 timed LMCache's 32K "hits" at 24 ms, faster than the link). Between tries the engine
    runs a 1-token request (a connector reports its saves done at a step); after ``wait_s``, raises.
    """
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    deadline = time.monotonic() + wait_s
    tries = 1
    while llm.reset_prefix_cache() is False:  # None (an old vLLM) counts as done
        if time.monotonic() > deadline:
            raise RuntimeError(f"vLLM refused to reset its prefix cache {tries} times in {wait_s:.0f} s: "
                               "blocks are still held (a running request, or a connector's unfinished save)")
        llm.generate([TokensPrompt(prompt_token_ids=[7])], SamplingParams(max_tokens=1), use_tqdm=False)
        time.sleep(0.01)
        tries += 1
    return tries


def start_llm(model: str, engine: dict[str, Any], kvtier: dict[str, Any] | None, kv_role: str = "kv_both") -> Any:
    """vLLM's ``LLM`` with ``engine`` kwargs, and kvtier as its connector in ``kv_role`` when ``kvtier``
    is a config dict. With ``load_format="dummy"`` the weights are :func:`use_kv_sensitive_dummy_weights`'."""
    from vllm import LLM
    from vllm.config import KVTransferConfig

    kw = dict(engine)
    if kw.get("load_format") == "dummy":
        use_kv_sensitive_dummy_weights()  # this process, and the engine processes forked from it
        _register_general_plugin("kvtier_dummy_weights", "kvtier.vllm.phases:use_kv_sensitive_dummy_weights")
    if kvtier is not None:
        kw["kv_transfer_config"] = KVTransferConfig(
            kv_connector="KVTierConnector", kv_connector_module_path="kvtier.vllm", kv_role=kv_role,
            kv_connector_extra_config=kvtier)
    return LLM(model=model, **kw)


def use_kv_sensitive_dummy_weights() -> None:
    """Make vLLM's dummy weights (``load_format="dummy"``) those of a model whose output depends on its KV.

    vLLM draws every dummy weight from U(-1e-3, 1e-3), norms included: every layer's output is then so
    small that the greedy tokens follow the last token alone (on the H100, two-token cycles at every
    prompt length), and a benchmark comparing outputs would pass whatever a connector loaded. Here
    norm weights (the 1-D tensors of a Llama) are 1 and matrices U(-b, b) with b = sqrt(3 / fan_in)
    (unit-variance projections), from a generator seeded per tensor as vLLM's is, so every engine
    process of a benchmark holds the same weights. :func:`start_llm` patches its own process (the
    engine processes vLLM forks inherit it) and registers this as a vLLM general plugin, which every
    process vLLM spawns (its CPU workers) runs at start-up. Integer and 1-byte tensors keep vLLM's own
    initialisation (scalars too).
    """
    import torch
    from vllm.model_executor.model_loader import dummy_loader, weight_utils

    vllms = weight_utils.initialize_single_dummy_weight
    if getattr(vllms, "kvtier_scaled", False):
        return

    @torch.no_grad()
    def scaled(param: torch.Tensor, low: float = -1e-3, high: float = 1e-3, seed: int = 1234) -> None:
        if (param.device.type == "meta" or param.dim() == 0 or not torch.is_floating_point(param)
                or param.element_size() < 2):
            vllms(param, low, high, seed)
        elif param.dim() == 1:
            param.fill_(1.0)
        else:
            bound = (3.0 / param.shape[-1]) ** 0.5
            param.uniform_(-bound, bound, generator=torch.Generator(device=param.device).manual_seed(seed))

    scaled.kvtier_scaled = True  # type: ignore[attr-defined]
    weight_utils.initialize_single_dummy_weight = scaled  # vLLM 0.24's initialize_dummy_weights calls it
    if hasattr(dummy_loader, "initialize_single_dummy_weight"):  # vLLM 0.32's loader imported it by name
        dummy_loader.initialize_single_dummy_weight = scaled


def _register_general_plugin(name: str, target: str) -> None:
    """Make ``target`` ("module:function") a vLLM general plugin for the engines this process starts.

    vLLM runs the entry points of group ``vllm.general_plugins`` in each of its processes, and Python
    finds entry points in any ``*.dist-info`` directory on the path: one is written to a temporary
    directory put on ``PYTHONPATH``, which the engine's processes inherit, spawned ones included.
    """
    import importlib
    import shutil

    if any(Path(d, f"{name}-0.dist-info").is_dir() for d in sys.path if d):
        return
    root = Path(tempfile.mkdtemp(prefix="kvtier-plugin-"))
    info = root / f"{name}-0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0\n")
    (info / "entry_points.txt").write_text(f"[vllm.general_plugins]\n{name} = {target}\n")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH", "")) if p)
    sys.path.insert(0, str(root))
    importlib.invalidate_caches()
    atexit.register(shutil.rmtree, root, True)


def _child(spec: dict[str, Any]) -> dict[str, Any]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from kvtier.trace import record

    t0 = time.perf_counter()
    llm = start_llm(spec["model"], spec["engine"], spec["kvtier"], spec.get("kv_role", "kv_both"))
    results: dict[str, Any] = {"startup_s": time.perf_counter() - t0, "steps": []}
    # Top-2 logprobs of the first token: when outputs differ, how close the race was.
    one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True, logprobs=2)
    for step in spec["steps"]:
        op = step["op"]
        if op == "ttft":
            t = time.perf_counter()
            (out,) = llm.generate([TokensPrompt(prompt_token_ids=step["prompt"])], one, use_tqdm=False)
            record("phase.ttft", t, time.perf_counter() - t, tokens=len(step["prompt"]))
            results["steps"].append({"op": op, "s": time.perf_counter() - t, "cached": out.num_cached_tokens,
                                     "tokens": list(out.outputs[0].token_ids), "top2": _top2(out)})
        elif op == "generate":
            sp = SamplingParams(max_tokens=step["max_tokens"], temperature=0.0, ignore_eos=True,
                                logprobs=2 if step.get("margins") else None)
            t = time.perf_counter()
            outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in step["prompts"]], sp, use_tqdm=False)
            results["steps"].append({"op": op, "s": time.perf_counter() - t,
                                     "cached": sum(o.num_cached_tokens or 0 for o in outs),
                                     "prompt_tokens": sum(len(p) for p in step["prompts"]),
                                     "outputs": [list(o.outputs[0].token_ids) for o in outs]})
            if step.get("margins"):
                results["steps"][-1]["margins"] = [_margins(o.outputs[0].logprobs) for o in outs]
        elif op == "metrics":  # after one more tiny request: the last step's counters reach the front end
            llm.generate([TokensPrompt(prompt_token_ids=[7] * 8)], one, use_tqdm=False)
            time.sleep(0.2)
            results["steps"].append({"op": op, "values": kvtier_metrics(llm, step.get("marks", ("kvtier",)))})
        elif op == "drop_page_cache":
            results["steps"].append({"op": op, **drop_page_cache_of(step["path"], step.get("files", "*.kvc"))})
        elif op == "settle":
            results["steps"].append({"op": op, **wait_writes_quiet(step["path"], step.get("files", "*.kvc"))})
        elif op == "reset_prefix_cache":
            results["steps"].append({"op": op, "tries": reset_prefix_cache(llm)})
        elif op == "profile_start":
            llm.start_profile(step.get("prefix"))
        elif op == "profile_stop":
            llm.stop_profile()
        else:
            raise ValueError(f"unknown step {op!r}")
        if "pass" in step:  # a caller's label, kept with the step's result
            results["steps"][-1]["pass"] = step["pass"]
    shutdown_engine(llm)
    return results


if __name__ == "__main__":
    result = _child(json.loads(sys.stdin.read()))
    sys.stdout.write(MARK + json.dumps(result) + "\n")
    sys.stdout.flush()
    from kvtier import trace

    trace.flush()  # os._exit runs no atexit hook
    os._exit(0)  # skip slow interpreter teardown of the engine's threads
