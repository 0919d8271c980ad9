"""Two vLLM engine processes on one `kvtier serve`: each finds the other's prefixes.

Greedy outputs of both equal those of an engine without kvtier. Uses the engine
harness of tests/vllm (engines in child processes, tiny random Llama).
"""

from __future__ import annotations

import os
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
from engine_proc import EngineProc  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ENGINE = dict(block_size=32, enable_prefix_caching=True, max_num_batched_tokens=256, num_gpu_blocks_override=64,
              max_model_len=1024, seed=0)


def test_two_engines_share_prefixes_through_one_server(tmp_path):
    from kvtier.models import make_random_llama
    from kvtier.server.server import ping

    model = make_random_llama(tmp_path / "tiny", "tiny")
    sock_dir = tempfile.mkdtemp(prefix="kvsv-", dir="/tmp")
    addr = f"ipc://{sock_dir}/s.sock"
    server = subprocess.Popen([sys.executable, "-m", "kvtier.cli", "serve", "--address", addr, "--tiers", "cpu",
                               "--cpu-bytes", "64MiB", "--log-level", "WARNING"])
    procs = []
    try:
        deadline = time.monotonic() + 60
        while not ping(addr, 0.2):
            assert server.poll() is None and time.monotonic() < deadline, "server did not start"
        env = {"PYTHONPATH": str(ROOT)}
        kv = {"chunk_size": 64, "server": addr, "op_timeout_s": 10, "tiers": ["cpu"]}  # no disk: hits come from the server only
        logs = tmp_path / "logs"
        logs.mkdir()
        base = EngineProc(model, ENGINE, None, wait=False, log_path=str(logs / "base.log"))
        a = EngineProc(model, ENGINE, kv, env=env, wait=False, log_path=str(logs / "a.log"))
        b = EngineProc(model, ENGINE, kv, env=env, wait=False, log_path=str(logs / "b.log"))
        procs += [base, a, b]
        for p in procs:
            p.wait_ready()
        rnd = random.Random(5)
        shared = [rnd.randrange(3, 1024) for _ in range(400)]
        p1 = [shared[:n] + [rnd.randrange(3, 1024) for _ in range(7)] for n in (200, 400)]
        p2 = [shared[:n] + [rnd.randrange(3, 1024) for _ in range(5)] for n in (150, 330)]
        base.send("generate", prompts=p1 + p2, max_tokens=8)
        out_a = a.generate(p1, 8)  # A computes and saves p1's chunks into the server
        out_b = b.generate(p1 + p2, 8)  # B has never seen them: only the server can supply them
        want = base.recv()["outputs"]
        assert out_a["outputs"] == want[:2]
        assert out_b["outputs"] == want
        assert all(c >= 128 for c in out_b["cached"]), out_b["cached"]
        out_a2 = a.generate(p2, 8, reset=True)  # and back: A finds what B saved
        assert out_a2["outputs"] == want[2:]
        assert all(c >= 128 for c in out_a2["cached"]), out_a2["cached"]
        for p in (a, b):
            st = p.stats()["store"]
            assert st["load_errors"] == 0
            assert "cpu_chunks" not in st  # the engine's store is a RemoteStore: no tier in its process
    finally:
        for p in procs:
            p.close()
        server.send_signal(signal.SIGTERM)
        assert server.wait(60) == 0
        shutil.rmtree(sock_dir, ignore_errors=True)
