"""Helpers shared by the benchmark scripts (run as ``python benchmarks/NAME.py``)."""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


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


def tiny_engine_pair(engine: dict, kvtier: dict, cpu: bool, sync_loads: bool = False):
    """(engine kwargs, vLLM alone, vLLM + kvtier, log dir): two engine processes on a tiny
    float32 Llama made here. ``cpu``: a dry run on vLLM's CPU engine with async scheduling forced."""
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
    kv = EngineProc(model, engine, kvtier, log_path=str(logs / "kvtier.log"), wait=False, timeout=900,
                    sync_loads=sync_loads)
    base.wait_ready()
    kv.wait_ready()
    print(f"engines up in {time.time() - t0:.0f} s", flush=True)
    return engine, base, kv, logs
