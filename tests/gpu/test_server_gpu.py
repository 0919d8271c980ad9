"""A `kvtier serve` client on a GPU machine: its background thread never breaks a CUDA graph capture.

vLLM captures CUDA graphs at start-up. A ``cudaHostRegister`` on another thread during a capture
(capture mode "global", torch's default and vLLM's) invalidates it, and the engine dies. A P/D
prefill engine died so on an H100: its first Hello timed out while the server reserved 64 GiB, and
the client's background thread connected and pinned the shared region during the capture.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

from kvtier.config import KVTierConfig  # noqa: E402
from kvtier.layout import ChunkLayout  # noqa: E402
from kvtier.server.client import RemoteStore  # noqa: E402
from kvtier.server.server import ping  # noqa: E402

LAYOUT = ChunkLayout(2, 256, 64, torch.bfloat16)


def _capture(x: torch.Tensor) -> None:
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(64):
            x.add_(1)


def test_a_client_connecting_in_the_background_never_breaks_a_capture():
    tmp = tempfile.mkdtemp(prefix="kvs-", dir="/tmp")
    addr = f"ipc://{tmp}/s.sock"
    cfg = KVTierConfig(server=addr, connect_timeout_s=0.5, retry_after_s=0.02, op_timeout_s=5.0)
    store = RemoteStore(cfg, LAYOUT, "gpu")  # no server yet: the background thread connects later
    proc = subprocess.Popen([sys.executable, "-m", "kvtier.cli", "serve", "--address", addr, "--tiers", "cpu",
                             "--cpu-bytes", str(4 << 30), "--log-level", "WARNING"], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not ping(addr, 0.2):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode()[-2000:]
        x = torch.zeros(1 << 20, device="cuda")
        captures = 0
        # Capture back to back while the background thread opens the session and maps 4 GiB, and
        # for a while after: a pin from that thread would land inside one of these captures.
        settle = None
        while settle is None or time.monotonic() < settle:
            _capture(x)
            captures += 1
            if settle is None and store.connected:
                settle = time.monotonic() + 1.0
            assert time.monotonic() < deadline, "the client did not connect"
        assert captures > 1
        assert not store._region.pinned, "the background thread pinned the region"
        ref = store.allocate()  # this thread loads and saves: it pins, outside any capture
        assert ref is not None and store._region.pinned
        ref.data.copy_(torch.ones(LAYOUT.nbytes, dtype=torch.uint8, device="cuda"), non_blocking=True)
        torch.cuda.synchronize()
        ref.release()
    finally:
        store.close()
        proc.terminate()
        proc.wait(30)
        shutil.rmtree(tmp, ignore_errors=True)
