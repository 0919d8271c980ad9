"""Faults during serving: outputs stay identical, nothing crashes, errors are counted.

- a corrupt chunk file on the disk tier (bit flips in the payload);
- chunks evicted between the scheduler's lookup and the worker's load;
- Redis killed between lookup and load (redis tier).

kvtier reports the chunks it could not load as failed blocks; vLLM recomputes them
(kvtier sets ``kv_load_failure_policy="recompute"``).
"""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
from conftest import engine_kwargs
from engine_proc import SUMMARY, same_as_vllm

ENGINE = engine_kwargs()


def _prompts(seed: int, n: int = 3) -> list[list[int]]:
    rnd = random.Random(seed)
    base = [rnd.randrange(3, 1024) for _ in range(700)]
    return [base[: rnd.randint(300, 700)] + [rnd.randrange(3, 1024) for _ in range(rnd.randint(0, 50))]
            for _ in range(n)]


@pytest.fixture(scope="module")
def disk_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("faults-disk")


@pytest.fixture(scope="module")
def pair(tiny_model, engines, disk_dir):
    # Disk only: every load reads a file, so a corrupt file is always seen.
    kvtier = {"chunk_size": 64, "tiers": ["disk"], "disk_path": str(disk_dir), "disk_bytes": "256MiB"}
    base, kv = engines.pair(tiny_model, ENGINE, kvtier)
    return base, kv


def test_corrupt_chunk_file(pair, disk_dir):
    base, kv = pair
    prompts = _prompts(1)
    same_as_vllm(base, kv, prompts, reset=False)
    kv.call("flush")
    files = sorted(disk_dir.rglob("*.kvc"))
    assert files, "nothing was written to the disk tier"
    for f in files:  # flip bytes in the middle of every payload
        b = bytearray(f.read_bytes())
        mid = 256 + (len(b) - 256) // 2
        b[mid:mid + 8] = bytes(x ^ 0xFF for x in b[mid:mid + 8])
        f.write_bytes(bytes(b))
    before = kv.stats()["store"]
    same_as_vllm(base, kv, prompts)
    after = kv.stats()["store"]
    print(f"\ncorrupt: before={before} after={after}")
    assert after["disk_corrupt"] > before["disk_corrupt"]
    assert after["load_errors"] > before["load_errors"]
    SUMMARY["load_errors"] += int(after["load_errors"] - before["load_errors"])
    same_as_vllm(base, kv, prompts)  # the recomputed chunks were saved again and load cleanly


def test_evicted_between_lookup_and_load(pair):
    base, kv = pair
    prompts = _prompts(2)
    same_as_vllm(base, kv, prompts, reset=False)
    kv.call("flush")
    kv.call("fault", faults=["evict_before_load"])
    before = kv.stats()
    same_as_vllm(base, kv, prompts)
    kv.call("fault", faults=[])
    after = kv.stats()
    print(f"\nevict: {after['counters']} {after['store']}")
    assert after["counters"]["faults_injected"] > before["counters"]["faults_injected"]
    assert after["store"]["load_errors"] > before["store"]["load_errors"]
    SUMMARY["load_errors"] += int(after["store"]["load_errors"] - before["store"]["load_errors"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server not installed")
def test_redis_killed_between_lookup_and_load(tiny_model, engines, tmp_path):
    port = _free_port()
    redis = subprocess.Popen(["redis-server", "--port", str(port), "--save", "", "--appendonly", "no",
                              "--dir", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), 0.1).close()
                break
            except OSError:
                time.sleep(0.05)
        kvtier = {"chunk_size": 64, "tiers": ["redis"], "redis_url": [f"redis://127.0.0.1:{port}"],
                  "op_timeout_s": 0.5, "connect_timeout_s": 0.5}
        base, kv = engines.pair(tiny_model, ENGINE, kvtier)
        prompts = _prompts(3)
        same_as_vllm(base, kv, prompts, reset=False)
        kv.call("flush")
        kv.call("fault", faults=["kill_before_load"], args={"pid": redis.pid})
        got = same_as_vllm(base, kv, prompts)
        st = kv.stats()
        print(f"\nredis: {st['counters']} {st['store']} cached={got['cached']}")
        assert st["counters"]["faults_injected"] == 1
        assert st["store"]["load_errors"] > 0
        assert st["store"]["redis_errors"] > 0
        SUMMARY["load_errors"] += int(st["store"]["load_errors"])
        same_as_vllm(base, kv, _prompts(4))  # serving goes on with the tier down
    finally:
        redis.kill()
        redis.wait()
