"""Shared fixtures: real redis-server processes, chunk directories, small chunk payloads."""

from __future__ import annotations

import os
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from kvtier import local_redis as servers
from kvtier.layout import ChunkLayout

SMALL_LAYOUT = ChunkLayout(4, 16, 64, torch.float16)  # 16 KiB chunks


def make_payload(seed: int, layout: ChunkLayout = SMALL_LAYOUT) -> np.ndarray:
    """A random chunk payload (uint8) of ``layout``, the same for the same seed."""
    return np.random.default_rng(seed).integers(0, 256, layout.nbytes, dtype=np.uint8)


def bounded(fn, timeout: float = 10.0):
    """Run ``fn`` in a thread; fail (instead of hanging the suite) if it blocks."""
    out: list = []
    t = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"{fn} blocked for {timeout} s"
    return out[0]


def make_keys(n: int, rng: np.random.Generator | None = None) -> list[bytes]:
    """``n`` distinct random 16-byte chunk keys."""
    rng = rng or np.random.default_rng()
    return [rng.bytes(16) for _ in range(n)]


def check_bytes(tier, keys: list[bytes], seeds: list[int]) -> list[bool]:
    """get_into ``keys``; every hit must hold exactly ``make_payload(seed)``."""
    dests = [np.zeros(SMALL_LAYOUT.nbytes, dtype=np.uint8) for _ in keys]
    ok = tier.get_into(keys, dests)
    for hit, d, s in zip(ok, dests, seeds):
        if hit:
            assert np.array_equal(d, make_payload(s))
    return ok


def skip_or_fail_in_ci(what: str, msg: str) -> None:
    """Skip a test whose system part is missing here; in CI, where it must run, fail instead."""
    if os.environ.get("CI"):
        pytest.fail(f"CI must run the {what} tests, but {msg}", pytrace=False)
    pytest.skip(msg)


def require_redis() -> None:
    """Skip (locally) or fail (in CI) when redis-server is not installed."""
    if servers.redis_server_binary() is None:
        skip_or_fail_in_ci("Redis", "redis-server is not installed: apt-get update && apt-get install -y redis-server")


@pytest.fixture(scope="session")
def _redis_proc():
    require_redis()
    srv = servers.RedisServer()
    yield srv
    srv.stop()


@pytest.fixture
def redis_server(_redis_proc) -> servers.RedisServer:
    """A running, empty redis-server (shared by the session; tests may kill and restart it)."""
    _redis_proc.resume()
    _redis_proc.start()
    with _redis_proc.client() as c:
        c.flushall()
    return _redis_proc


@pytest.fixture(scope="module")
def redis_cluster():
    """A 3-primary Redis Cluster on loopback; tests that kill a node bring it back."""
    require_redis()
    cluster = servers.RedisClusterProcs(3)
    yield cluster
    cluster.stop()


def require_mooncake() -> None:
    """Skip (locally) or fail (in CI) when Mooncake (the kvtier[mooncake] extra) is not importable."""
    try:
        from kvtier.tiers.mooncake import import_store

        import_store()
    except ImportError as e:
        skip_or_fail_in_ci("Mooncake", f"Mooncake is not importable ({e}): pip install 'kvtier[mooncake]' "
                                       f"and apt-get install -y libibverbs1")


@pytest.fixture(scope="session")
def mooncake_master():
    """A mooncake_master with its HTTP metadata server on loopback (shared by the session)."""
    require_mooncake()
    from kvtier.local_mooncake import MooncakeMaster

    master = MooncakeMaster()
    yield master
    master.stop()


@pytest.fixture
def tmp_chunk_dir(tmp_path: Path) -> Path:
    return tmp_path / "chunks"


def mount_tmpfs(path: Path, options: str) -> None:
    """Mount a tmpfs at ``path`` (skips the test when mounting is not permitted here)."""
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN): {r.stderr.strip()}")


def remount(path: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(path)], check=True, capture_output=True)


def umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.fixture
def tmpfs(tmp_path: Path):
    """``make(name, options)`` mounts a tmpfs under tmp_path; all are unmounted afterwards."""
    mounted: list[Path] = []

    def make(name: str, options: str) -> Path:
        p = tmp_path / name
        mount_tmpfs(p, options)
        mounted.append(p)
        return p

    yield make
    for p in reversed(mounted):
        umount(p)
