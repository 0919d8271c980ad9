"""Write-behind from a child process (``writer: process``): real child processes, real files, real Redis."""

from __future__ import annotations

import logging
import os
import signal
import time

import numpy as np
import pytest

from kvtier.config import ConfigError, KVTierConfig
from kvtier.store import Store, resolve_writer
from kvtier.tiers.disk import DiskTier
from tests.conftest import SMALL_LAYOUT, make_keys, make_payload


def process_store(tmp_path, **kw) -> Store:
    cfg = dict(chunk_size=SMALL_LAYOUT.tokens, tiers=("cpu", "disk"), cpu_bytes=64 * SMALL_LAYOUT.nbytes,
               disk_path=str(tmp_path / "disk"), disk_bytes=1 << 30, writer="process")
    cfg.update(kw)
    store = Store(KVTierConfig(**cfg), SMALL_LAYOUT)
    assert store._process is not None, "the store did not start a writer process"
    return store


def read_back(path, keys) -> list[np.ndarray | None]:
    """Each key's payload as another process's disk tier reads it from ``path``."""
    tier = DiskTier(path, 1 << 30, SMALL_LAYOUT)
    out = []
    for k in keys:
        buf = np.zeros(SMALL_LAYOUT.nbytes, dtype=np.uint8)
        out.append(buf if tier.get_into([k], [buf])[0] else None)
    tier.close()
    return out


def test_chunks_written_by_the_child_are_on_disk_and_counted(tmp_path):
    keys = make_keys(12)
    with process_store(tmp_path) as s:
        child = s._process.proc
        for i, k in enumerate(keys):
            assert s.put(k, make_payload(i))
        assert s.flush(60)
        assert s.pending_writes() == 0
        disk = s.lower[0].stats()
        assert (disk.puts, disk.bytes_written, disk.errors) == (12, 12 * SMALL_LAYOUT.nbytes, 0)
        assert s.lower[0].contains(keys) == [True] * 12  # learned from the child's journal records
        assert s.lower[0].stats().chunks == 12
        assert s.pool.free_slots == s.pool.num_slots - 12  # only the cpu tier's references remain
    assert child.poll() == 0, "close() leaves the writer process running"
    got = read_back(tmp_path / "disk", keys)
    for i, buf in enumerate(got):
        assert buf is not None and np.array_equal(buf, make_payload(i))


def test_a_killed_child_releases_its_slots_and_writing_goes_on_in_process(tmp_path, caplog):
    keys = make_keys(20)
    with process_store(tmp_path) as s:
        for i, k in enumerate(keys[:5]):
            s.put(k, make_payload(i))
        assert s.flush(60)
        os.kill(s._process.proc.pid, signal.SIGSTOP)  # the next chunks stay with it, unwritten
        for i, k in enumerate(keys[5:10], 5):
            s.put(k, make_payload(i))
        assert s.pending_writes() == 5
        with caplog.at_level(logging.WARNING, logger="kvtier.store"):
            os.kill(s._process.proc.pid, signal.SIGKILL)
            deadline = time.monotonic() + 30
            while s.pending_writes() and time.monotonic() < deadline:
                time.sleep(0.01)
        assert s.pending_writes() == 0, "the chunks a dead child held are never released"
        assert drops(s, "writer_lost") == 5
        assert "writer process ended" in caplog.text
        s.cpu.delete(keys[:10])  # the cpu tier lets go too: every slot must be free again
        assert s.pool.free_slots == s.pool.num_slots, "the dead child's slots were never released"
        for i, k in enumerate(keys[10:], 10):
            assert s.put(k, make_payload(i))
        assert s.flush(60)
        assert s._writers, "no writer threads took over"
    got = read_back(tmp_path / "disk", keys)
    assert [g is not None for g in got] == [True] * 5 + [False] * 5 + [True] * 10
    for i in list(range(5)) + list(range(10, 20)):
        assert np.array_equal(got[i], make_payload(i))


def drops(s: Store, reason: str) -> float:
    return s.metrics.value("kvtier_dropped_writes_by_reason_total", {"reason": reason})


def test_a_stalled_child_bounds_the_slots_it_holds_and_loses_nothing(tmp_path):
    """A child that stops answering pins at most queue_depth slots; the later chunks wait in the
    cpu tier, unwritten, and reach the disk once the child goes on."""
    keys = make_keys(40)
    with process_store(tmp_path, write_queue_depth=8) as s:
        s.put(keys[0], make_payload(0))
        assert s.flush(60)
        os.kill(s._process.proc.pid, signal.SIGSTOP)
        for i, k in enumerate(keys[1:], 1):
            assert s.put(k, make_payload(i))
        assert s.pinned_writes() == 8
        assert s.pending_writes() == 39
        assert s.metrics.value("kvtier_dropped_writes_total") == 0
        os.kill(s._process.proc.pid, signal.SIGCONT)
        assert s.flush(60)
    got = read_back(tmp_path / "disk", keys)
    assert all(g is not None and np.array_equal(g, make_payload(i)) for i, g in enumerate(got))


def test_bursts_into_a_stopped_child_all_reach_the_disk(tmp_path):
    """Issue 25.4 with a writer process: five bursts of 3N/4 chunks (about 4N in all) into an
    N-slot cpu tier, each saved while the child is stopped, so the disk is behind by more than the
    N/2 writes that may pin slots. Before, every chunk past N/2 of a burst was dropped."""
    n = 16
    keys = make_keys(5 * (3 * n // 4))
    with process_store(tmp_path, cpu_bytes=n * SMALL_LAYOUT.nbytes) as s:
        assert s.queue_depth == n // 2
        child = s._process.proc.pid
        for burst in range(5):
            os.kill(child, signal.SIGSTOP)
            for i in range(burst * 3 * n // 4, (burst + 1) * 3 * n // 4):
                assert s.put(keys[i], make_payload(i))
                assert s.pinned_writes() <= s.queue_depth
            os.kill(child, signal.SIGCONT)
            assert s.flush(60)
        assert s.metrics.value("kvtier_dropped_writes_total") == 0
    got = read_back(tmp_path / "disk", keys)
    assert all(g is not None and np.array_equal(g, make_payload(i)) for i, g in enumerate(got))


def test_a_stalled_child_and_a_full_cpu_tier_lose_chunks_counted(tmp_path):
    """Past what the cpu tier holds, a chunk that is still unwritten when evicted is lost: counted
    with its reason; the rest reach the disk; puts never fail."""
    keys = make_keys(40)
    with process_store(tmp_path, cpu_bytes=16 * SMALL_LAYOUT.nbytes) as s:
        child = s._process.proc.pid
        os.kill(child, signal.SIGSTOP)
        for i, k in enumerate(keys):
            assert s.put(k, make_payload(i))
        assert s.pinned_writes() == 8
        lost = drops(s, "evicted_unwritten")
        assert lost == 40 - 16 and s.metrics.value("kvtier_dropped_writes_total") == lost
        os.kill(child, signal.SIGCONT)
        assert s.flush(60)
    got = read_back(tmp_path / "disk", keys)
    assert sum(g is not None for g in got) == 40 - lost


def test_the_child_writes_to_redis(tmp_path, redis_server):
    keys = make_keys(6)
    with process_store(tmp_path, tiers=("cpu", "disk", "redis"), redis_url=[redis_server.url]) as s:
        for i, k in enumerate(keys):
            s.put(k, make_payload(i))
        assert s.flush(60)
        redis = s.lower[1]
        assert redis.stats().puts == 6
        assert redis.contains(keys) == [True] * 6
        buf = np.zeros(SMALL_LAYOUT.nbytes, dtype=np.uint8)
        assert redis.get_into([keys[3]], [buf]) == [True]
        assert np.array_equal(buf, make_payload(3))


def test_writer_setting():
    with pytest.raises(ConfigError, match="writer"):
        KVTierConfig(writer="fork")
    assert resolve_writer(KVTierConfig(writer="threads")) == "threads"
    assert resolve_writer(KVTierConfig(writer="process")) == "process"
    import torch

    assert resolve_writer(KVTierConfig()) == ("process" if torch.cuda.is_available() else "threads")


def test_a_store_given_its_tiers_writes_from_threads(tmp_path):
    """The child builds tiers from config; tiers handed in (tests, custom backends) stay in-process."""
    tier = DiskTier(tmp_path / "d", 1 << 30, SMALL_LAYOUT)
    cfg = KVTierConfig(chunk_size=SMALL_LAYOUT.tokens, tiers=("cpu", "disk"), cpu_bytes=8 * SMALL_LAYOUT.nbytes,
                       writer="process")
    with Store(cfg, SMALL_LAYOUT, tiers=[tier]) as s:
        assert s._process is None and s._writers
        s.put(b"k" * 16, make_payload(1))
        assert s.flush(30)
        assert tier.contains([b"k" * 16]) == [True]
