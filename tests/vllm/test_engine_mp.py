"""vLLM's default multi-process engine with kvtier.

There the scheduler runs in the engine-core process and the model runner in a worker
process of the multiproc executor: two stores, one per process. The scheduler's lookups
find the worker's saves through a tier both processes share (disk), or, for the worker's
cpu tier, through the changes the worker reports after each step.
"""

from __future__ import annotations

import random
import time

from conftest import engine_kwargs
from engine_proc import SUMMARY

ENGINE = engine_kwargs()


def _rounds(base, kv, prompts: list[list[int]], resets: tuple[bool, ...], pause_s: float = 0.0) -> list:
    """Generate ``prompts`` on both engines once per entry of ``resets`` (True: vLLM's prefix
    cache emptied first); outputs must match. Returns kvtier's cached tokens per round."""
    cached = []
    for reset in resets:
        time.sleep(pause_s)
        base.send("generate", prompts=prompts, max_tokens=8, reset=reset)
        got = kv.generate(prompts, 8, reset=reset)
        assert got["outputs"] == base.recv()["outputs"]
        cached.append(got["cached"])
        SUMMARY["scenarios"] += 1
    print(f"\ncached tokens per round: {cached}")
    return cached


def test_multiprocess_engine_hits_and_equality(tiny_model, engines, tmp_path):
    kvtier = {"chunk_size": 64, "tiers": ["cpu", "disk"], "cpu_bytes": "64MiB",
              "disk_path": str(tmp_path / "disk"), "disk_bytes": "64MiB"}
    base, kv = engines.pair(tiny_model, ENGINE, kvtier, multiprocess=True)
    rnd = random.Random(11)
    shared = [rnd.randrange(3, 1024) for _ in range(500)]
    prompts = [shared[:n] + [rnd.randrange(3, 1024) for _ in range(9)] for n in (130, 300, 500)]
    cached = _rounds(base, kv, prompts, (False, True, True), pause_s=0.5)  # the pause: write-behind to disk
    # After a prefix-cache reset, only kvtier can supply cached tokens.
    assert all(c >= 128 for c in cached[1])
    SUMMARY["hit_tokens"] += sum(cached[1]) + sum(cached[2])


def test_multiprocess_engine_cpu_tier_only(tiny_model, engines):
    """Only a cpu tier, in the worker process: the scheduler learns of the worker's chunks from the
    worker's per-step reports (KVTierWorkerMetadata), so a prompt repeated right after its first run,
    with vLLM's prefix cache reset, is served by kvtier -- no shared tier, no waiting."""
    kvtier = {"chunk_size": 64, "tiers": ["cpu"], "cpu_bytes": "64MiB"}
    base, kv = engines.pair(tiny_model, ENGINE, kvtier, multiprocess=True)
    rnd = random.Random(12)
    shared = [rnd.randrange(3, 1024) for _ in range(400)]
    prompts = [shared[:n] + [rnd.randrange(3, 1024) for _ in range(9)] for n in (150, 390)]
    cached = _rounds(base, kv, prompts, (False, True))
    assert all(c >= 128 for c in cached[1]), cached  # whole chunks of 64 below each prompt's last block
    SUMMARY["hit_tokens"] += sum(cached[1])
