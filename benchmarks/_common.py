"""Helpers shared by the benchmark scripts (run as ``python benchmarks/NAME.py``)."""

from __future__ import annotations

import json
import multiprocessing as mp
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def median_s(fn, reps: int) -> float:
    """Median seconds of ``reps`` calls of ``fn``."""
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def merge_json(path: str | None, label: str, payload: dict) -> None:
    """Store ``payload`` under ``label`` in the JSON file at ``path`` (keeping other labels: before / after)."""
    if not path:
        return
    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, ValueError):
        doc = {}
    doc[label] = payload
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)


def tiny_engine_pair(engine: dict, kvtier: dict | None, cpu: bool, sync_loads: bool = False,
                     lmcache: dict[str, str] | None = None, connector_engine: dict | None = None):
    """(engine kwargs, vLLM alone, vLLM + kvtier, log dir): two engine processes on a tiny
    float32 Llama made here. ``cpu``: a dry run on vLLM's CPU engine with async scheduling forced.
    ``lmcache``: LMCache's settings; the second engine then runs LMCache instead of kvtier.
    ``connector_engine``: engine kwargs of the second engine only (LMCache's failure policy)."""
    sys.path.insert(0, str(ROOT / "tests" / "vllm"))
    from engine_proc import EngineProc

    from kvtier.models import make_random_llama

    engine = dict(engine)
    if cpu:
        engine.update(async_scheduling=True, enforce_eager=True)
        engine.pop("gpu_memory_utilization", None)
    model = make_random_llama(Path(tempfile.mkdtemp()) / "tiny", "tiny")
    logs = Path(tempfile.mkdtemp())
    t0 = time.time()
    base = EngineProc(model, engine, None, log_path=str(logs / "base.log"), wait=False, timeout=900)
    kv = EngineProc(model, {**engine, **(connector_engine or {})}, kvtier, log_path=str(logs / "connector.log"),
                    wait=False, timeout=900, sync_loads=sync_loads, lmcache=lmcache)
    base.wait_ready()
    kv.wait_ready()
    print(f"engines up in {time.time() - t0:.0f} s", flush=True)
    return engine, base, kv, logs


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q))


def start_server(addr: str, cpu_bytes: int) -> subprocess.Popen:
    """A `kvtier serve` subprocess (cpu tier only) at ``addr``, once it answers."""
    from kvtier.server.server import ping

    proc = subprocess.Popen([sys.executable, "-m", "kvtier.cli", "serve", "--address", addr, "--tiers", "cpu",
                             "--cpu-bytes", str(cpu_bytes), "--log-level", "WARNING"])
    deadline = time.monotonic() + 60
    while not ping(addr, 0.2):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("server did not start")
    return proc


def start_workers(target, args_per_worker: list[tuple]) -> tuple[list, list]:
    """One spawned process per ``args`` tuple, running ``target(*args, pipe)``; returns (pipes,
    processes) once every worker sent "ready" on its pipe."""
    ctx = mp.get_context("spawn")
    pipes, procs = [], []
    for args in args_per_worker:
        a, b = ctx.Pipe()
        p = ctx.Process(target=target, args=(*args, b), daemon=True)
        p.start()
        pipes.append(a)
        procs.append(p)
    for a in pipes:
        assert a.recv() == "ready"
    return pipes, procs


def stop_workers(pipes: list, procs: list, timeout_s: float) -> None:
    """Tell each worker of :func:`start_workers` to stop (None) and wait for it."""
    for a in pipes:
        a.send(None)
    for p in procs:
        p.join(timeout_s)
