"""vLLM engine processes on one `kvtier serve`: sharing, concurrency, a dead server.

Greedy outputs always equal those of an engine without kvtier. Uses the engine
harness of tests/vllm (engines in child processes, tiny random Llama), whose
sentinel check runs around every load here too: the slots below a load's start
(prefix-cache blocks other requests may read) are never written, now with the
chunks coming from another process's shared memory.
"""

from __future__ import annotations

import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytest.importorskip("vllm")
pytestmark = pytest.mark.engine

sys.path.insert(0, str(Path(__file__).parent / "vllm"))
from engine_proc import SUMMARY, EngineProc  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# A small pool and token budget: concurrent requests get preempted, prefills are chunked.
ENGINE = dict(block_size=32, enable_prefix_caching=True, max_num_batched_tokens=128, num_gpu_blocks_override=24,
              max_model_len=512, seed=0, scheduler_reserve_full_isl=False)


def _start_server(addr: str) -> subprocess.Popen:
    from kvtier.server.server import ping

    server = subprocess.Popen([sys.executable, "-m", "kvtier.cli", "serve", "--address", addr, "--tiers", "cpu",
                               "--cpu-bytes", "64MiB", "--log-level", "WARNING"])
    deadline = time.monotonic() + 60
    while not ping(addr, 0.2):
        assert server.poll() is None and time.monotonic() < deadline, "server did not start"
    return server


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(server handle holder, base engine, engine A, engine B, address); A and B use the server."""
    from kvtier.models import make_random_llama

    tmp = tmp_path_factory.mktemp("server-vllm")
    model = make_random_llama(tmp / "tiny", "tiny")
    sock_dir = tempfile.mkdtemp(prefix="kvsv-", dir="/tmp")
    addr = f"ipc://{sock_dir}/s.sock"
    holder = {"server": _start_server(addr)}
    # No local tier: hits come from the server only. Short timeouts: a dead server costs little.
    kv = {"chunk_size": 64, "server": addr, "op_timeout_s": 2, "connect_timeout_s": 1, "retry_after_s": 0.5,
          "tiers": ["cpu"]}
    env = {"PYTHONPATH": str(ROOT)}
    procs = [EngineProc(model, ENGINE, None, wait=False, log_path=str(tmp / "base.log")),
             EngineProc(model, ENGINE, kv, env=env, wait=False, log_path=str(tmp / "a.log")),
             EngineProc(model, ENGINE, kv, env=env, wait=False, log_path=str(tmp / "b.log"))]
    try:
        for p in procs:
            p.wait_ready()
        yield holder, *procs, addr
    finally:
        for p in procs:
            p.close()
        server = holder["server"]
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
            assert server.wait(60) == 0
        shutil.rmtree(sock_dir, ignore_errors=True)


def _prompts(rnd: random.Random, shared: list[int], lengths: tuple[int, ...], tail: int = 6) -> list[list[int]]:
    return [shared[:n] + [rnd.randrange(3, 1024) for _ in range(tail)] for n in lengths]


def test_two_engines_share_prefixes_through_one_server(setup):
    _, base, a, b, _ = setup
    rnd = random.Random(5)
    shared = [rnd.randrange(3, 1024) for _ in range(400)]
    p1 = _prompts(rnd, shared, (200, 400))
    p2 = _prompts(rnd, shared, (150, 330))
    base.send("generate", prompts=p1 + p2, max_tokens=8, reset=True)
    out_a = a.generate(p1, 8, reset=True)  # A computes and saves p1's chunks into the server
    out_b = b.generate(p1 + p2, 8, reset=True)  # B has never seen them: only the server can supply them
    want = base.recv()["outputs"]
    assert out_a["outputs"] == want[:2]
    assert out_b["outputs"] == want
    assert all(c >= 128 for c in out_b["cached"]), out_b["cached"]
    out_a2 = a.generate(p2, 8, reset=True)  # and back: A finds what B saved
    assert out_a2["outputs"] == want[2:]
    assert all(c >= 128 for c in out_a2["cached"]), out_a2["cached"]
    for p in (a, b):
        st = p.stats()
        assert st["store"]["load_errors"] == 0
        assert "cpu_chunks" not in st["store"]  # the engine's store is a RemoteStore: no tier in its process
        assert st["counters"]["overlap_violations"] == 0
    SUMMARY["scenarios"] += 3


def test_concurrent_engines_with_preemption_then_a_dead_server(setup):
    holder, base, a, b, addr = setup
    rnd = random.Random(11)
    docs = [[rnd.randrange(3, 1024) for _ in range(420)] for _ in range(3)]
    before = {p: p.stats()["counters"] for p in (a, b)}

    # 1. Both engines at once, each with more work than its pool holds at a time.
    batch_a = [d[:n] + [rnd.randrange(3, 1024) for _ in range(5)] for d in docs for n in (300, 410)]
    batch_b = [d[:n] + [rnd.randrange(3, 1024) for _ in range(9)] for d in reversed(docs) for n in (280, 400)]
    want_a = base.generate(batch_a, 24, reset=True)["outputs"]  # the same batches, one after the other
    want_b = base.generate(batch_b, 24, reset=True)["outputs"]
    a.send("generate", prompts=batch_a, max_tokens=24, reset=True)
    b.send("generate", prompts=batch_b, max_tokens=24, reset=True)
    got_a, got_b = a.recv(), b.recv()
    assert got_a["outputs"] == want_a
    assert got_b["outputs"] == want_b
    after = {p: p.stats() for p in (a, b)}
    preempted = sum(after[p]["counters"]["preemptions"] - before[p]["preemptions"] for p in (a, b))
    checks = sum(after[p]["counters"]["overlap_checks"] - before[p]["overlap_checks"] for p in (a, b))
    loaded = sum(after[p]["worker"].get("loaded_tokens", 0) for p in (a, b))
    print(f"\nconcurrent: preemptions={preempted} overlap_checks={checks} loaded_tokens={loaded}")
    assert preempted >= 1, "no preemption: the pool is not small enough for this test"
    assert loaded > 0, "no engine loaded anything from the server"
    assert all(after[p]["counters"]["overlap_violations"] == 0 for p in (a, b))
    SUMMARY["scenarios"] += 2
    SUMMARY["preemptions"] += preempted

    # 2. The server dies (SIGKILL, mid-run for the engines): they keep serving, by recomputing.
    holder["server"].kill()
    holder["server"].wait(30)
    more = [d[:n] + [rnd.randrange(3, 1024) for _ in range(7)] for d in docs for n in (350,)]
    base.send("generate", prompts=more, max_tokens=8, reset=True)
    got_a = a.generate(more, 8, reset=True)
    assert got_a["outputs"] == base.recv()["outputs"]
    SUMMARY["scenarios"] += 1

    # 3. The server comes back at the same address: the engines reconnect and share again.
    holder["server"] = _start_server(addr)
    fresh = [rnd.randrange(3, 1024) for _ in range(300)]
    base.send("generate", prompts=[fresh], max_tokens=8, reset=True)
    want = base.recv()["outputs"]
    deadline = time.monotonic() + 60
    while True:
        out = a.generate([fresh], 8, reset=True)  # saves into the new server once reconnected
        assert out["outputs"] == want
        out = b.generate([fresh], 8, reset=True)
        assert out["outputs"] == want
        if out["cached"][0] >= 256:
            break
        assert time.monotonic() < deadline, "engines did not share through the restarted server"
        time.sleep(0.5)
    SUMMARY["scenarios"] += 1
    SUMMARY["hit_tokens"] += out["cached"][0]
