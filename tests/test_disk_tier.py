"""The disk tier on real files: restart, LRU, corruption, full and read-only disks, threads."""

import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import SMALL_LAYOUT, bounded, make_keys, make_payload, remount
from kvtier.config import ConfigError
from kvtier.layout import ChunkLayout, checksum
from kvtier.tiers.direct_reads import resident_pages
from kvtier.tiers.disk import DATA_OFFSET, TMP_PREFIX, USAGE_FILE, DiskTier
from kvtier.tiers.journal import JOURNAL_FILE

N = SMALL_LAYOUT.nbytes
FILE = DATA_OFFSET + N  # bytes of one chunk file


def chunk_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name not in (USAGE_FILE, JOURNAL_FILE))


def temp_files(root: Path) -> list[Path]:
    return [p for p in chunk_files(root) if p.name.startswith(TMP_PREFIX)]


def read(tier: DiskTier, key: bytes) -> np.ndarray | None:
    d = np.zeros(N, dtype=np.uint8)
    return d if tier.get_into([key], [d]) == [True] else None


def test_files_fan_out_by_first_key_byte(tmp_chunk_dir):
    tier = DiskTier(tmp_chunk_dir, 100 * FILE, SMALL_LAYOUT)
    keys = [bytes([b]) + bytes(15) for b in (0x00, 0xAB, 0xAB, 0xFF)]
    keys[2] = keys[2][:-1] + b"\x01"
    tier.put(keys, [make_payload(i) for i in range(4)])
    names = {str(p.relative_to(tmp_chunk_dir)) for p in chunk_files(tmp_chunk_dir)}
    assert names == {f"{k[:1].hex()}/{k.hex()}.kvc" for k in keys}
    assert all(p.stat().st_size == FILE for p in chunk_files(tmp_chunk_dir))


def test_restart_rebuilds_index_in_lru_order(tmp_chunk_dir):
    keys = make_keys(4)
    tier = DiskTier(tmp_chunk_dir, 4 * FILE, SMALL_LAYOUT, label="m")
    for i, k in enumerate(keys):
        tier.put([k], [make_payload(i)])
        os.utime(tier._path(k), ns=(10**18 + i * 10**9,) * 2)  # distinct mtimes, in put order
    assert read(tier, keys[0]) is not None  # keys[0] becomes most recent (mtime refreshed)
    tier.close()
    # A crash left a temp file behind.
    leftover = tmp_chunk_dir / keys[1][:1].hex() / f"{TMP_PREFIX}123-4"
    leftover.write_bytes(b"partial")

    tier = DiskTier(tmp_chunk_dir, 4 * FILE, SMALL_LAYOUT, label="m")
    assert not leftover.exists()
    assert tier.contains(keys) == [True] * 4
    s = tier.stats()
    assert (s.chunks, s.bytes) == (4, 4 * FILE)
    for i, k in enumerate(keys):
        assert np.array_equal(read(tier, k), make_payload(i))
    assert {c.key: (c.nbytes, c.label) for c in tier.scan()} == {k: (N, "m") for k in keys}

    # LRU order survived the restart: reads above touched all; rebuild again and evict one.
    tier.close()
    for i, k in enumerate(keys):
        os.utime(tier._path(k), ns=(10**18 + (3 - i) * 10**9,) * 2)  # keys[3] oldest now
    tier = DiskTier(tmp_chunk_dir, 4 * FILE, SMALL_LAYOUT)
    tier.put(make_keys(1), [make_payload(9)])
    assert tier.contains(keys) == [True, True, True, False]


def test_restart_with_a_smaller_cap_evicts_down_to_it(tmp_chunk_dir):
    tier = DiskTier(tmp_chunk_dir, 6 * FILE, SMALL_LAYOUT)
    tier.put(make_keys(6), [make_payload(i) for i in range(6)])
    tier.close()
    tier = DiskTier(tmp_chunk_dir, 2 * FILE, SMALL_LAYOUT)
    assert tier.stats().chunks == 2
    assert tier.wait_trimmed(10)
    assert len(chunk_files(tmp_chunk_dir)) == 2


def test_a_smaller_cap_serves_at_once_and_trims_behind(tmp_chunk_dir, monkeypatch):
    """Issue 17.3: halving the cap of 327K chunks took 19.4 s of deletions before the tier served.
    The index is trimmed at once (the oldest go); their files are removed by a background thread,
    which never removes a chunk put again meanwhile."""
    import kvtier.tiers.disk as disk

    keys = make_keys(8)
    tier = DiskTier(tmp_chunk_dir, 8 * FILE, SMALL_LAYOUT)
    for i, k in enumerate(keys):
        tier.put([k], [make_payload(i)])
    # Recency after a restart comes from mtimes, which a fast box writes within one clock tick
    # (the order then falls back to the keys'): spell out the write order.
    t0 = time.time_ns() - 10**9
    for i, k in enumerate(keys):
        os.utime(tier._path(k), ns=(t0 + i * 10**6, t0 + i * 10**6))
    tier.close()
    gate = threading.Event()
    trim = disk.DiskTier._trim
    monkeypatch.setattr(disk.DiskTier, "_trim", lambda self, victims: gate.wait(30) and trim(self, victims))
    tier = bounded(lambda: DiskTier(tmp_chunk_dir, 3 * FILE, SMALL_LAYOUT), timeout=5)
    assert tier.contains(keys) == [False] * 5 + [True] * 3  # serving, the oldest five gone from the index
    assert np.array_equal(read(tier, keys[7]), make_payload(7))
    assert tier.put([keys[0]], [make_payload(0)]) == [True]  # a victim put again before its file went
    assert len(chunk_files(tmp_chunk_dir)) == 7  # that put evicted keys[5]; nothing else removed yet
    gate.set()
    assert tier.wait_trimmed(10)
    assert {p.name for p in chunk_files(tmp_chunk_dir)} == {Path(tier._path(k)).name for k in [keys[0]] + keys[6:]}
    assert np.array_equal(read(tier, keys[0]), make_payload(0))
    assert tier.stats().chunks == 3 and tier.stats().errors == 0


def test_a_miss_never_touches_the_files(tmp_chunk_dir, monkeypatch):
    """Issue 17.2: a lookup miss cost one stat() per key (1.4 ms for a 128K-token prompt). Chunks
    written by another process sharing the directory are learned from its journal, in one stat()."""
    tier = DiskTier(tmp_chunk_dir, 100 * FILE, SMALL_LAYOUT)
    calls: list[str] = []
    for name in ("stat", "lstat", "open", "access"):
        real = getattr(os, name)
        monkeypatch.setattr(os, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    assert tier.contains(make_keys(64)) == [False] * 64
    assert len(calls) <= 1, calls


def test_lru_eviction_respects_capacity(tmp_chunk_dir):
    tier = DiskTier(tmp_chunk_dir, 4 * FILE + 100, SMALL_LAYOUT)
    keys = make_keys(6)
    tier.put(keys[:4], [make_payload(i) for i in range(4)])
    assert read(tier, keys[0]) is not None  # keys[0] is now the most recently used
    tier.put(keys[4:], [make_payload(4), make_payload(5)])
    assert tier.contains(keys) == [True, False, False, True, True, True]
    s = tier.stats()
    assert s.evictions == 2 and s.chunks == 4 and s.bytes <= s.capacity_bytes
    assert len(chunk_files(tmp_chunk_dir)) == 4
    assert np.array_equal(read(tier, keys[0]), make_payload(0))


def test_eviction_skips_protected_keys(tmp_chunk_dir):
    leased: set[bytes] = set()
    tier = DiskTier(tmp_chunk_dir, 3 * FILE, SMALL_LAYOUT, protected=lambda k: k in leased)
    keys = make_keys(6)
    tier.put(keys[:3], [make_payload(i) for i in range(3)])
    leased.update(keys[:2])  # the two oldest are being loaded
    assert tier.put([keys[3]], [make_payload(3)]) == [True]
    assert tier.contains(keys[:4]) == [True, True, False, True]
    leased.add(keys[3])
    assert tier.put([keys[4]], [make_payload(4)]) == [False]  # everything is leased: no room
    assert tier.stats().errors == 1 and not temp_files(tmp_chunk_dir)
    leased.clear()
    assert tier.put([keys[5]], [make_payload(5)]) == [True]
    assert tier.contains(keys[:1] + keys[5:]) == [False, True]
    for i in (1, 3, 5):
        assert np.array_equal(read(tier, keys[i]), make_payload(i))


def _damage_flip(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[DATA_OFFSET + 1234] ^= 0x01
    path.write_bytes(bytes(raw))


def _damage_truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(DATA_OFFSET + N // 2)


def _damage_header_magic(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[0:4] = b"XXXX"
    path.write_bytes(bytes(raw))


def _damage_empty(path: Path) -> None:
    path.write_bytes(b"")


@pytest.mark.parametrize("damage", [_damage_flip, _damage_truncate, _damage_header_magic, _damage_empty])
def test_damaged_file_is_a_counted_miss_and_removed(tmp_chunk_dir, damage):
    tier = DiskTier(tmp_chunk_dir, 10 * FILE, SMALL_LAYOUT)
    keys = make_keys(2)
    tier.put(keys, [make_payload(0), make_payload(1)])
    path = Path(tier._path(keys[0]))
    damage(path)
    d = np.zeros(N, dtype=np.uint8)
    assert tier.get_into(keys, [d, np.zeros(N, dtype=np.uint8)]) == [False, True]
    s = tier.stats()
    assert (s.corrupt, s.misses, s.hits) == (1, 1, 1)
    assert not path.exists()
    assert tier.contains(keys) == [False, True]
    assert np.array_equal(read(tier, keys[1]), make_payload(1))
    # The key can be stored again.
    assert tier.put([keys[0]], [make_payload(0)]) == [True]
    assert np.array_equal(read(tier, keys[0]), make_payload(0))


def test_chunk_of_another_layout_or_key_is_a_miss(tmp_path):
    other_layout = ChunkLayout(4, 16, 64, torch.bfloat16)  # same size, other dtype
    a = DiskTier(tmp_path / "a", 10 * FILE, SMALL_LAYOUT)
    b = DiskTier(tmp_path / "b", 10 * FILE, other_layout)
    k1, k2 = make_keys(2)
    a.put([k1], [make_payload(1)])
    b.put([k1], [make_payload(2)])
    # b's file of k1 copied over a's: right key, wrong layout.
    Path(a._path(k1)).write_bytes(Path(b._path(k1)).read_bytes())
    assert read(a, k1) is None
    # a's file of k1 renamed as k2: right layout, wrong key.
    a.put([k1], [make_payload(1)])
    a.put([k2], [make_payload(3)])
    os.replace(a._path(k1), a._path(k2))
    assert read(a, k2) is None
    s = a.stats()
    assert s.corrupt == 2 and s.hits == 0
    assert not Path(a._path(k2)).exists()


def test_streaming_checksum_matches_layout_checksum():
    x = make_payload(3)
    h = xxhash.xxh3_64()
    for i in range(0, N, 1000):
        h.update(memoryview(x)[i:i + 1000])
    assert h.intdigest() == checksum(memoryview(x))
    assert checksum(memoryview(x)) == xxhash.xxh3_64_intdigest(memoryview(x))  # files written before stay valid


def test_checksum_lets_other_threads_run():
    """The disk tier's writer threads checksum every 32 MiB chunk in the engine's process; the
    engine's thread must be able to run meanwhile. xxhash 3.x's one-shot functions hold the GIL
    for the whole hash (the hasher's update releases it): on the H200 host that made planning a
    load 4.4x slower while chunks were written behind (benchmarks/bench_writer_gil.py).

    With a long switch interval a thread holding the GIL in C keeps it until the hash is done and
    it has recorded its end, so the main thread can wake up before that end only if the GIL was free.
    """
    big = memoryview(bytearray(256 << 20))
    assert _main_runs_while(lambda: checksum(big))


def _main_runs_while(work) -> bool:
    """Whether this thread runs while another thread does ``work`` (before it ends): with a long
    switch interval that happens only if ``work`` gives the GIL up."""
    started, times = threading.Event(), {}

    def run() -> None:
        started.set()
        work()
        times["work_end"] = time.perf_counter()

    old = sys.getswitchinterval()
    sys.setswitchinterval(1.0)
    try:
        t = threading.Thread(target=run)
        t.start()
        started.wait()
        times["main_ran"] = time.perf_counter()
        t.join()
    finally:
        sys.setswitchinterval(old)
    return times["main_ran"] < times["work_end"]


def test_full_disk_put_fails_cleanly_and_recovers(tmpfs):
    root = tmpfs("small", "size=512k")
    tier = DiskTier(root / "chunks", 100 * FILE, SMALL_LAYOUT)  # the cap is above what fits
    keys = make_keys(40)
    ok = [tier.put([k], [make_payload(i)])[0] for i, k in enumerate(keys)]
    stored = [k for k, o in zip(keys, ok) if o]
    assert 5 < len(stored) < 40 and not all(ok[len(stored):])
    s = tier.stats()
    assert s.errors == 40 - len(stored) and s.chunks == len(stored)
    assert not temp_files(root)
    assert all(p.stat().st_size == FILE for p in chunk_files(root / "chunks"))
    for k in stored:
        assert np.array_equal(read(tier, k), make_payload(keys.index(k)))
    # Space comes back: puts work again.
    tier.delete(stored[:3])
    assert tier.put([keys[-1]], [make_payload(39)]) == [True]
    assert np.array_equal(read(tier, keys[-1]), make_payload(39))


def test_read_only_directory_is_a_config_error(tmpfs):
    ro = tmpfs("ro", "ro,size=1m")
    with pytest.raises(ConfigError, match="disk_path=.*not writable"):
        DiskTier(ro, 10 * FILE, SMALL_LAYOUT)
    with pytest.raises(ConfigError, match="disk_path=.*cannot create"):
        DiskTier(ro / "sub", 10 * FILE, SMALL_LAYOUT)


def test_unusable_path_or_size_is_a_config_error(tmp_path):
    """Needs no mount: runs wherever the tmpfs tests are skipped."""
    a_file = tmp_path / "file"
    a_file.write_bytes(b"x")
    with pytest.raises(ConfigError, match="disk_path="):
        DiskTier(a_file / "chunks", 10 * FILE, SMALL_LAYOUT)
    with pytest.raises(ConfigError, match="disk_path=.*not a directory"):
        DiskTier(a_file, 10 * FILE, SMALL_LAYOUT)
    with pytest.raises(ConfigError, match="disk_bytes"):
        DiskTier(tmp_path / "tiny", FILE - 1, SMALL_LAYOUT)


def test_disk_turning_read_only_fails_puts_keeps_reads(tmpfs):
    root = tmpfs("rw", "size=2m")
    tier = DiskTier(root, 50 * FILE, SMALL_LAYOUT)
    keys = make_keys(4)
    assert tier.put(keys[:2], [make_payload(0), make_payload(1)]) == [True, True]
    remount(root, "ro")
    try:
        assert tier.put(keys[2:], [make_payload(2), make_payload(3)]) == [False, False]
        assert tier.stats().errors == 2
        assert np.array_equal(read(tier, keys[0]), make_payload(0))
    finally:
        remount(root, "rw")
    assert tier.put(keys[2:], [make_payload(2), make_payload(3)]) == [True, True]
    assert not temp_files(root)
    assert np.array_equal(read(tier, keys[3]), make_payload(3))


def test_directory_removed_behind_its_back_recovers(tmp_chunk_dir):
    import shutil

    tier = DiskTier(tmp_chunk_dir, 10 * FILE, SMALL_LAYOUT)
    (k,) = make_keys(1)
    tier.put([k], [make_payload(0)])
    shutil.rmtree(tmp_chunk_dir)
    assert read(tier, k) is None  # a miss, not an exception
    tmp_chunk_dir.mkdir()
    assert tier.put([k], [make_payload(0)]) in ([True], [False])  # the subdirectory is made again
    assert tier.put([k], [make_payload(0)]) == [True]
    assert np.array_equal(read(tier, k), make_payload(0))


def test_concurrent_puts_and_gets_never_return_wrong_bytes(tmp_chunk_dir):
    tier = DiskTier(tmp_chunk_dir, 20 * FILE, SMALL_LAYOUT)  # small: eviction under way
    keys = make_keys(40)
    payloads = {k: make_payload(i) for i, k in enumerate(keys)}
    errors: list[str] = []

    def writer(part: list[bytes]) -> None:
        for _ in range(3):
            for k in part:
                tier.put([k], [payloads[k]])

    def reader() -> None:
        d = np.zeros(N, dtype=np.uint8)
        for _ in range(4):
            for k in keys:
                if tier.get_into([k], [d]) == [True] and not np.array_equal(d, payloads[k]):
                    errors.append(k.hex())

    threads = [threading.Thread(target=writer, args=(keys[i::2],)) for i in range(2)]
    threads += [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    s = tier.stats()
    assert s.corrupt == 0 and s.errors == 0 and s.bytes <= s.capacity_bytes
    assert len([p for p in chunk_files(tmp_chunk_dir)]) == s.chunks
    assert not temp_files(tmp_chunk_dir)


OPS = st.lists(
    st.one_of(
        st.tuples(st.just("put"), st.integers(0, 11), st.integers(0, 3)),
        st.tuples(st.just("get"), st.integers(0, 11), st.just(0)),
        st.tuples(st.just("delete"), st.integers(0, 11), st.just(0)),
        st.tuples(st.just("restart"), st.just(0), st.just(0)),
    ),
    max_size=40,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPS)
def test_random_sequences_against_a_dict_model(tmp_path_factory, ops):
    root = tmp_path_factory.mktemp("model")
    keys = [bytes([i]) * 16 for i in range(12)]
    cap = 5
    tier = DiskTier(root, cap * FILE, SMALL_LAYOUT)
    model: dict[bytes, int] = {}  # key -> seed of the payload last put
    d = np.zeros(N, dtype=np.uint8)
    for op, ki, seed in ops:
        k = keys[ki]
        if op == "put":
            assert tier.put([k], [make_payload(seed)]) == [True]
            model[k] = seed
        elif op == "get":
            if tier.get_into([k], [d]) == [True]:
                assert k in model and np.array_equal(d, make_payload(model[k]))  # never wrong bytes
        elif op == "delete":
            tier.delete([k])
            model.pop(k, None)
            assert tier.contains([k]) == [False]
        else:
            tier.close()
            tier = DiskTier(root, cap * FILE, SMALL_LAYOUT)
        held = [k for k in keys if tier.contains([k])[0]]
        assert set(held) <= set(model)  # evicted keys may miss; unknown ones never hit
        assert len(held) <= cap
        assert tier.stats().bytes <= cap * FILE
    s = tier.stats()
    assert s.corrupt == 0 and s.errors == 0


def test_two_processes_share_one_directory(tmp_chunk_dir):
    """A tier sees chunks another process wrote after it started (how engines share a disk)."""
    import subprocess
    import sys

    reader = DiskTier(tmp_chunk_dir, 1 << 30, SMALL_LAYOUT)
    keys = make_keys(3)
    code = (
        "import sys, numpy as np; from conftest import SMALL_LAYOUT, make_payload;"
        "from kvtier.tiers.disk import DiskTier;"
        f"t = DiskTier({str(tmp_chunk_dir)!r}, 1 << 30, SMALL_LAYOUT);"
        f"keys = [bytes.fromhex(h) for h in {[k.hex() for k in keys]!r}];"
        "assert all(t.put(keys, [make_payload(i) for i in range(3)]))"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(__file__))
    assert reader.contains(keys) == [True, True, True]
    dests = [np.zeros(SMALL_LAYOUT.nbytes, np.uint8) for _ in keys]
    assert reader.get_into(keys, dests) == [True, True, True]
    assert all(np.array_equal(d, make_payload(i)) for i, d in enumerate(dests))
    # a file removed by the other process is a miss, not an error
    os.unlink(reader._path(keys[0]))
    assert reader.get_into(keys[:1], dests[:1]) == [False]
    assert reader.stats().errors == 0


def test_a_fifo_named_like_a_chunk_never_blocks(tmp_chunk_dir):
    """Issue 14.5: a FIFO named like a chunk: lookup said hit, then get (and kvtier inspect) blocked forever."""
    from kvtier.tiers.scan import scan_disk

    keys = make_keys(3)
    tier = DiskTier(tmp_chunk_dir, 100 * FILE, SMALL_LAYOUT, label="m")
    tier.put(keys[:2], [make_payload(0), make_payload(1)])
    os.unlink(tier._path(keys[1]))
    os.mkfifo(tier._path(keys[1]))  # replaced behind the running tier's back
    os.makedirs(os.path.dirname(tier._path(keys[2])), exist_ok=True)
    os.mkfifo(tier._path(keys[2]))  # never a chunk
    assert bounded(lambda: read(tier, keys[1])) is None
    assert bounded(lambda: tier.contains(keys)) == [True, False, False]
    assert bounded(lambda: read(tier, keys[2])) is None
    assert np.array_equal(read(tier, keys[0]), make_payload(0))
    assert [c.key for c in bounded(lambda: list(scan_disk(str(tmp_chunk_dir))))] == [keys[0]]
    assert [c.key for c in bounded(lambda: list(tier.scan()))] == [keys[0]]
    tier.close()
    reopened = bounded(lambda: DiskTier(tmp_chunk_dir, 100 * FILE, SMALL_LAYOUT, label="m"))
    assert bounded(lambda: reopened.contains(keys)) == [True, False, False]


def test_directory_removed_while_running(tmp_chunk_dir):
    """Issue 14.6: after `rm -rf` of the directory each sub-directory lost its next write, and the
    index kept claiming chunks that were gone."""
    import shutil

    keys = make_keys(40)
    tier = DiskTier(tmp_chunk_dir, 100 * FILE, SMALL_LAYOUT, label="m")
    assert tier.put(keys[:20], [make_payload(i) for i in range(20)]) == [True] * 20
    shutil.rmtree(tmp_chunk_dir)
    assert [read(tier, k) for k in keys[:20]] == [None] * 20
    assert tier.contains(keys[:20]) == [False] * 20, "chunks whose files are gone are still indexed"
    assert tier.put(keys[20:], [make_payload(i) for i in range(20, 40)]) == [True] * 20
    assert all(np.array_equal(read(tier, k), make_payload(20 + i)) for i, k in enumerate(keys[20:]))
    assert tier.stats().errors == 0


def _fill(root: str, cap: int, start: int, n: int, barrier) -> None:
    tier = DiskTier(root, cap, SMALL_LAYOUT, label="m")
    barrier.wait(60)  # both tiers are open (each indexed the empty directory) before either writes
    keys = make_keys(start + n)[start:]
    for i, k in enumerate(keys):
        tier.put([k], [make_payload(start + i)])
    tier.close()


def test_two_processes_share_one_cap(tmp_chunk_dir):
    """Issue 14.7: two processes on one disk_path each kept their own account: 416 files
    against a 300-chunk cap. Several processes on one directory is how engines share chunks
    (and vLLM's scheduler and worker processes each open the tier), so they share the cap."""
    import multiprocessing as mp

    cap_chunks = 60
    DiskTier(tmp_chunk_dir, cap_chunks * FILE, SMALL_LAYOUT, label="m").close()
    ctx = mp.get_context("fork")  # spawn would import this module again, and whichever conftest is first on sys.path
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_fill, args=(str(tmp_chunk_dir), cap_chunks * FILE, 1000 * i, 100, barrier))
             for i in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    files = chunk_files(tmp_chunk_dir)
    assert cap_chunks // 2 <= len(files) <= cap_chunks, f"{len(files)} files against a {cap_chunks}-chunk cap"
    reopened = DiskTier(tmp_chunk_dir, cap_chunks * FILE, SMALL_LAYOUT, label="m")
    assert reopened.stats().chunks == len(files)


def test_journal_carries_writes_and_removals_across_rotations(tmp_chunk_dir, monkeypatch):
    """A reader sharing the directory learns every chunk a writer put, and forgets those it evicted,
    while the journal is replaced many times (a small MAX_BYTES here); one that slept through a
    whole journal says so and asks the file system instead."""
    import kvtier.tiers.journal as journal

    monkeypatch.setattr(journal, "MAX_BYTES", 5 * journal.RECORD)
    writer = DiskTier(tmp_chunk_dir, 10 * FILE, SMALL_LAYOUT)
    reader = DiskTier(tmp_chunk_dir, 10 * FILE, SMALL_LAYOUT)
    keys = make_keys(60)

    def agree(upto: int) -> None:
        window = keys[max(0, upto - 15):upto]
        assert reader.contains(window) == writer.contains(window)
        dests = [np.zeros(N, np.uint8) for _ in window]
        got = reader.get_into(window, dests)
        assert got == writer.contains(window)
        assert all(np.array_equal(d, make_payload(keys.index(k))) for k, d, ok in zip(window, dests, got) if ok)

    for i, k in enumerate(keys[:30]):  # the reader looks after every put: keeps up
        writer.put([k], [make_payload(i)])
        agree(i + 1)
    assert not reader._journal.gap
    for i, k in enumerate(keys[30:], start=30):  # asleep through many journals
        writer.put([k], [make_payload(i)])
    agree(60)
    assert reader._journal.gap
    assert os.path.getsize(tmp_chunk_dir / JOURNAL_FILE) < 6 * journal.RECORD
    assert reader.stats().errors == 0


# ---- parallel reads, O_DIRECT (issue 25.3) ------------------------------------------------------

BIG = ChunkLayout(2, 256, 1536, torch.float16)  # 3 MiB: three 1 MiB read pieces


def aligned_dests(n: int, nbytes: int = N) -> list[np.ndarray]:
    """``n`` page-aligned destinations (pinned host memory is; a plain numpy allocation is not)."""
    import mmap

    from kvtier.memory import HostPool

    pool = HostPool(nbytes, n, pin=False, buffer=torch.frombuffer(mmap.mmap(-1, n * nbytes), dtype=torch.uint8))
    return [pool.view(pool.alloc()).numpy() for _ in range(n)]


def evict(path: str, start: int = 0, length: int = 0) -> None:
    """Drop ``path``'s pages (``length`` bytes from ``start``, 0: all) from the page cache."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # dirty pages are not dropped
        os.posix_fadvise(fd, start, length, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def resident(path: str, offset: int, length: int) -> int:
    """How many pages of ``[offset, offset + length)`` of ``path`` are in the page cache (``length``
    0: to the end); unlike :func:`page_cached`, asking reads nothing in."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return resident_pages(fd, offset, length or os.fstat(fd).st_size)
    finally:
        os.close(fd)


def evict_checked(paths: list[str], tries: int = 20) -> None:
    """:func:`evict` each of ``paths`` until no page of it is in the page cache. Checking the first
    page of the payload only was not enough: in a CI run the file's last page was still cached
    after the O_DIRECT reads that followed, which read none of it through the page cache."""
    for _ in range(tries):
        for path in paths:
            evict(path)
        if not any(resident(path, 0, 0) for path in paths):
            return
        time.sleep(0.05)
    raise AssertionError(f"pages of {paths} stay in the page cache")


def page_cached(path: str, offset: int) -> bool:
    """Whether the page at ``offset`` is in the page cache. When not, this reads it (only it:
    without POSIX_FADV_RANDOM a read that may not wait starts the readahead of what follows)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        os.preadv(fd, [bytearray(4096)], offset, os.RWF_NOWAIT)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def direct_tier(root: Path, layout: ChunkLayout = SMALL_LAYOUT, n: int = 100) -> DiskTier:
    """A tier on ``root``, or a skip where that file system can neither evict pages nor do O_DIRECT (tmpfs)."""
    tier = DiskTier(root, n * (DATA_OFFSET + layout.nbytes), layout)
    probe = root / "probe"
    probe.write_bytes(bytes(2 * 4096))
    evict(str(probe))
    try:
        os.close(os.open(probe, os.O_RDONLY | os.O_DIRECT))
    except OSError:
        pytest.skip("no O_DIRECT on this file system")
    try:
        if page_cached(str(probe), 4096):
            pytest.skip("this file system keeps its pages in memory")
    except OSError as e:  # tmpfs: EOPNOTSUPP
        pytest.skip(f"RWF_NOWAIT reads fail here ({e.strerror})")
    probe.unlink()
    return tier


def test_a_batch_is_read_by_the_tiers_threads_a_single_chunk_inline(tmp_chunk_dir, monkeypatch):
    tier = DiskTier(tmp_chunk_dir, 100 * FILE, SMALL_LAYOUT, read_threads=4)
    keys = make_keys(12)
    tier.put(keys, [make_payload(i) for i in range(12)])
    readers: set[str] = set()
    real = tier._get_one
    monkeypatch.setattr(tier, "_get_one", lambda k, o: readers.add(threading.current_thread().name) or real(k, o))
    dests = [np.zeros(N, np.uint8) for _ in range(2)]
    assert tier.get_into([keys[0], make_keys(1)[0]], dests) == [True, False]  # one chunk to read
    assert tier._readers is None and readers == {threading.current_thread().name}
    dests = [np.zeros(N, np.uint8) for _ in keys]
    assert tier.get_into(keys, dests) == [True] * 12
    assert all(np.array_equal(d, make_payload(i)) for i, d in enumerate(dests))
    assert any(name.startswith("kvtier-disk-read") for name in readers)
    s = tier.stats()
    assert (s.hits, s.misses, s.bytes_read) == (13, 1, 13 * FILE)
    pool = tier._readers
    tier.close()
    assert tier._readers is None and pool._shutdown


def test_parallel_reads_account_like_sequential_ones(tmp_chunk_dir):
    """A damaged chunk asked twice in one batch is one corrupt miss and one plain miss; LRU order
    and counters come out as when chunks were read one after another."""
    tier = DiskTier(tmp_chunk_dir, 6 * FILE, SMALL_LAYOUT)
    keys = make_keys(5)
    tier.put(keys, [make_payload(i) for i in range(5)])
    _damage_flip(Path(tier._path(keys[1])))
    order = [keys[0], keys[1], keys[2], keys[1], keys[4], keys[0]]
    dests = [np.zeros(N, np.uint8) for _ in order]
    assert tier.get_into(order, dests) == [True, False, True, False, True, True]
    s = tier.stats()
    assert (s.hits, s.misses, s.corrupt, s.errors) == (4, 2, 1, 0)
    assert s.bytes_read == 4 * FILE and not Path(tier._path(keys[1])).exists()
    assert np.array_equal(dests[5], make_payload(0))
    tier.put(make_keys(3), [make_payload(i) for i in range(3)])  # 6 fit: keys[3], never read, goes first
    assert tier.contains(keys) == [True, False, True, False, True]
    with pytest.raises(ValueError, match="destination"):
        tier.get_into(keys[:2], [np.zeros(N, np.uint8), np.zeros(N - 1, np.uint8)])


def test_chunks_not_in_the_page_cache_are_read_with_o_direct(tmp_chunk_dir):
    tier = direct_tier(tmp_chunk_dir)
    keys = make_keys(6)
    tier.put(keys, [make_payload(i) for i in range(6)])
    evict_checked([tier._path(k) for k in keys[:4]])
    dests = aligned_dests(6)
    assert tier.get_into(keys, dests) == [True] * 6
    assert all(np.array_equal(d, make_payload(i)) for i, d in enumerate(dests))
    s = tier.stats()
    assert s.extra["direct_reads"] == 4 and s.extra["direct_bytes"] == 4 * N  # the cached two: buffered
    assert s.hits == 6 and s.bytes_read == 6 * FILE
    # O_DIRECT left the page cache alone: the payload's first page only, which the probe that
    # found it out of the page cache brought in (RWF_NOWAIT starts the read of the page it misses)
    assert resident(tier._path(keys[0]), DATA_OFFSET + 4096, N - 4096) == 0
    # A destination off a page boundary reads through the page cache.
    evict(tier._path(keys[0]))
    off_page = aligned_dests(1, N + 4096)[0][64:64 + N]
    assert tier.get_into(keys[:1], [off_page]) == [True]
    assert np.array_equal(off_page, make_payload(0))
    assert tier.stats().extra["direct_reads"] == 4


def test_only_the_pieces_not_in_the_page_cache_are_read_with_o_direct(tmp_chunk_dir):
    tier = direct_tier(tmp_chunk_dir, BIG, 4)
    (k,) = make_keys(1)
    data = make_payload(5, BIG)
    tier.put([k], [data])
    path = tier._path(k)
    evict(path)  # all of it (a range would keep the large folios across its ends), then read back
    fd = os.open(path, os.O_RDONLY)  # the header page, the first and the last MiB: not the middle one
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no readahead
    for offset, length in ((0, DATA_OFFSET + (1 << 20)), (DATA_OFFSET + (2 << 20), 1 << 20)):
        assert len(os.pread(fd, length, offset)) == length
    os.close(fd)
    last_pages = [DATA_OFFSET + ((i + 1) << 20) - 4096 for i in range(3)]  # the tier asks about first pages
    assert [page_cached(path, offset) for offset in last_pages] == [True, False, True]
    (d,) = aligned_dests(1, BIG.nbytes)
    assert tier.get_into([k], [d]) == [True]
    assert np.array_equal(d, data)
    assert tier.stats().extra["direct_bytes"] == 1 << 20


def test_damaged_chunk_read_with_o_direct_is_a_counted_miss(tmp_chunk_dir):
    tier = direct_tier(tmp_chunk_dir)
    keys = make_keys(3)
    tier.put(keys, [make_payload(i) for i in range(3)])
    _damage_flip(Path(tier._path(keys[1])))
    evict_checked([tier._path(k) for k in keys])
    assert tier.get_into(keys, aligned_dests(3)) == [True, False, True]
    s = tier.stats()
    assert (s.hits, s.misses, s.corrupt, s.extra["direct_reads"]) == (2, 1, 1, 2)
    assert not Path(tier._path(keys[1])).exists()


def test_without_o_direct_reads_go_through_the_page_cache(tmp_chunk_dir):
    tier = DiskTier(tmp_chunk_dir, 100 * FILE, SMALL_LAYOUT)
    tier.direct_io = False
    keys = make_keys(4)
    tier.put(keys, [make_payload(i) for i in range(4)])
    for k in keys:
        evict(tier._path(k))
    dests = aligned_dests(4)
    assert tier.get_into(keys, dests) == [True] * 4
    assert all(np.array_equal(d, make_payload(i)) for i, d in enumerate(dests))
    assert tier.stats().extra["direct_reads"] == 0


def test_a_file_system_refusing_o_direct_is_remembered(tmp_chunk_dir, monkeypatch):
    tier = direct_tier(tmp_chunk_dir)
    keys = make_keys(4)
    tier.put(keys, [make_payload(i) for i in range(4)])
    for k in keys:
        evict(tier._path(k))
    tries: list[int] = []
    real = os.open

    def no_direct(path, flags, *a, **kw):
        if flags & os.O_DIRECT:
            tries.append(flags)
            raise OSError(22, "Invalid argument")  # what a file system without O_DIRECT answers
        return real(path, flags, *a, **kw)

    monkeypatch.setattr(os, "open", no_direct)
    dests = aligned_dests(4)
    assert tier.get_into(keys, dests) == [True] * 4
    assert all(np.array_equal(d, make_payload(i)) for i, d in enumerate(dests))
    assert not tier.direct_io and 1 <= len(tries) <= 4  # the batch's threads may all have tried once
    s = tier.stats()
    assert s.extra["direct_reads"] == 0 and s.errors == 0 and s.hits == 4
    for k in keys:
        evict(tier._path(k))
    assert tier.get_into(keys, dests) == [True] * 4
    assert len(tries) <= 4


def test_without_rwf_nowait_reads_go_through_the_page_cache(tmp_chunk_dir, monkeypatch):
    tier = direct_tier(tmp_chunk_dir)
    keys = make_keys(3)
    tier.put(keys, [make_payload(i) for i in range(3)])
    for k in keys:
        evict(tier._path(k))
    real = os.preadv

    def old_kernel(fd, bufs, offset, flags=0):
        if flags & os.RWF_NOWAIT:
            raise OSError(95, "Operation not supported")
        return real(fd, bufs, offset, flags)

    monkeypatch.setattr(os, "preadv", old_kernel)
    dests = aligned_dests(3)
    assert tier.get_into(keys, dests) == [True] * 3
    assert all(np.array_equal(d, make_payload(i)) for i, d in enumerate(dests))
    assert not tier.nowait_probe and tier.stats().extra["direct_reads"] == 0


def test_hashing_a_read_piece_lets_other_threads_run():
    """The reader threads hash each 1 MiB piece with xxh3_64().update, which must release the GIL
    for the threads to read in parallel."""
    piece = memoryview(bytearray(1 << 20))

    def hash_pieces() -> None:
        h = xxhash.xxh3_64()
        for _ in range(256):
            h.update(piece)

    assert _main_runs_while(hash_pieces)


def _read_batch_in_child(tier: DiskTier, keys: list[bytes], q) -> None:
    dests = [np.zeros(N, np.uint8) for _ in keys]
    ok = bounded(lambda: tier.get_into(keys, dests))
    q.put(ok == [True] * len(keys) and all(np.array_equal(d, make_payload(i)) for i, d in enumerate(dests)))


def test_a_forked_child_reads_with_threads_of_its_own(tmp_chunk_dir):
    """A child forked after the tier's reader threads started has the pool but not the threads."""
    import multiprocessing as mp

    tier = DiskTier(tmp_chunk_dir, 100 * FILE, SMALL_LAYOUT, read_threads=2)
    keys = make_keys(4)
    tier.put(keys, [make_payload(i) for i in range(4)])
    assert tier.get_into(keys, [np.zeros(N, np.uint8) for _ in keys]) == [True] * 4
    assert tier._readers is not None
    time.sleep(0.2)  # both threads idle: the child's pool counts on them and starts none
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_read_batch_in_child, args=(tier, keys, q))
    p.start()
    assert q.get(timeout=30) is True
    p.join(30)
    assert p.exitcode == 0


# ---- issue 29: the journal, the shared cap and foreign edits --------------------------------------

def test_a_torn_journal_record_hides_no_later_record(tmp_chunk_dir):
    """Issue 29.2: a short write (a full file system) left a partial record; every later record
    was misread by every reader until the journal rotated."""
    writer = DiskTier(tmp_chunk_dir, 100 * FILE, SMALL_LAYOUT)
    reader = DiskTier(tmp_chunk_dir, 100 * FILE, SMALL_LAYOUT)
    keys = make_keys(6)
    writer.put(keys[:2], [make_payload(0), make_payload(1)])
    assert reader.contains(keys[:2]) == [True, True]
    for torn in (b"\x05" * 17, bytes(3), b"\xc5\x4b\x10" + bytes(20)):  # torn, zeros, a forged magic
        with open(tmp_chunk_dir / JOURNAL_FILE, "ab") as f:
            f.write(torn)
    writer.put(keys[2:], [make_payload(i) for i in range(2, 6)])
    assert reader.contains(keys) == [True] * 6
    assert read(reader, keys[5]) is not None
    late = DiskTier(tmp_chunk_dir, 100 * FILE, SMALL_LAYOUT)  # a reader starting past the torn bytes
    more = make_keys(9)[6:]
    writer.put(more, [make_payload(i) for i in range(3)])
    assert late.contains(more) == [True] * 3 and reader.contains(more) == [True] * 3


def test_a_fifo_or_link_named_like_the_journal_or_usage_file(tmp_chunk_dir, tmp_path):
    """Issue 29.1: a FIFO at .kvtier-journal blocked DiskTier() (and Store()) forever; both shared
    files were opened through symbolic links, letting whoever writes the directory make kvtier
    append to any file its user can write."""
    tmp_chunk_dir.mkdir(parents=True)
    os.mkfifo(tmp_chunk_dir / JOURNAL_FILE)
    target = tmp_path / "victim"
    target.write_bytes(b"precious")
    os.symlink(target, tmp_chunk_dir / USAGE_FILE)
    keys = make_keys(3)
    tier = bounded(lambda: DiskTier(tmp_chunk_dir, 100 * FILE, SMALL_LAYOUT))
    assert bounded(lambda: tier.put(keys, [make_payload(i) for i in range(3)])) == [True] * 3
    assert bounded(lambda: tier.contains(keys)) == [True] * 3
    assert target.read_bytes() == b"precious"
    os.unlink(tmp_chunk_dir / JOURNAL_FILE)
    os.symlink(target, tmp_chunk_dir / JOURNAL_FILE)
    assert bounded(lambda: tier.put(keys, [make_payload(i) for i in range(3)])) == [True] * 3
    other = bounded(lambda: DiskTier(tmp_chunk_dir, 100 * FILE, SMALL_LAYOUT))
    assert bounded(lambda: other.contains(keys)) == [True] * 3
    assert target.read_bytes() == b"precious"


def test_chunk_files_removed_behind_its_back_leave_the_shared_count(tmp_chunk_dir):
    """Issue 29.3: files removed outside kvtier stayed counted in .kvtier-usage: with the cap full
    of them, no put succeeded until a restart."""
    tier = DiskTier(tmp_chunk_dir, 50 * FILE, SMALL_LAYOUT)
    keys = make_keys(100)
    assert tier.put(keys[:50], [make_payload(i) for i in range(50)]) == [True] * 50
    for p in chunk_files(tmp_chunk_dir):
        p.unlink()
    assert read(tier, keys[0]) is None  # one found gone by a read, the rest by eviction
    assert tier.put(keys[50:], [make_payload(i) for i in range(50)]) == [True] * 50
    assert len(chunk_files(tmp_chunk_dir)) == 50


def test_after_lost_journal_records_a_repeated_miss_stats_once(tmp_chunk_dir, monkeypatch):
    """Issue 29 (weak spot): after one missed rotation each lookup of unknown keys stat()ed every
    one of them for the life of the process (a 512-key miss 3.4-4.1 ms instead of 0.15)."""
    import kvtier.tiers.journal as journal

    monkeypatch.setattr(journal, "MAX_BYTES", 5 * journal.RECORD)
    writer = DiskTier(tmp_chunk_dir, 100 * FILE, SMALL_LAYOUT)
    reader = DiskTier(tmp_chunk_dir, 100 * FILE, SMALL_LAYOUT)
    keys = make_keys(30)
    writer.put(keys[:20], [make_payload(i) for i in range(20)])
    assert reader.contains(keys) == [True] * 20 + [False] * 10
    assert reader._journal.gap
    stats = []
    real_stat = os.stat
    monkeypatch.setattr(os, "stat", lambda *a, **k: stats.append(a[0]) or real_stat(*a, **k))
    assert reader.contains(keys[20:]) == [False] * 10
    assert [p for p in stats if str(p).endswith(".kvc")] == []
    writer.put(keys[20:21], [make_payload(20)])  # written after the miss: learned from the journal
    assert reader.contains(keys[20:22]) == [True, False]


def test_a_huge_journal_is_skipped_not_read_on_every_lookup(tmp_chunk_dir):
    """Issue 29 (weak spot): a huge or sparse journal made each lookup read 16 MiB under the lock."""
    import kvtier.tiers.journal as journal

    reader = DiskTier(tmp_chunk_dir, 100 * FILE, SMALL_LAYOUT)
    with open(tmp_chunk_dir / JOURNAL_FILE, "ab") as f:
        f.truncate(1 << 30)  # sparse: reads as zeros
    keys = make_keys(5)
    t0 = time.perf_counter()
    for _ in range(10):
        assert reader.contains(keys[1:]) == [False] * 4
    assert time.perf_counter() - t0 < 0.5
    writer = DiskTier(tmp_chunk_dir, 100 * FILE, SMALL_LAYOUT)
    writer.put(keys[:1], [make_payload(0)])
    assert reader.contains(keys[:1]) == [True]


def test_page_cached_tells_a_file_in_the_page_cache_from_one_on_the_device(tmp_chunk_dir):
    """The cost model's probe (DiskTier.page_cached): a chunk just written is in the page cache, an
    evicted one is not, however often it is asked."""
    tier = direct_tier(tmp_chunk_dir)
    keys = make_keys(3)
    assert tier.put(keys, [make_payload(i) for i in range(3)]) == [True] * 3
    assert tier.page_cached(keys) is True
    evict_checked([tier._path(k) for k in keys[1:]])
    assert tier.page_cached(keys[:1]) is True
    assert tier.page_cached(keys) is False  # one of them is on the device only
    # Asking reads nothing in: the scheduler asks again each round a request waits, and a probe that
    # read in what it asked about would call a cold hit cached the second time.
    assert tier.page_cached(keys[1:2]) is False
    assert tier.page_cached(keys[1:2]) is False
    assert tier.page_cached(keys[2:]) is False
    assert resident(tier._path(keys[1]), 0, 0) == resident(tier._path(keys[2]), 0, 0) == 0
    assert tier.page_cached([b"\x00" * 32]) is None  # no such file: cannot tell
