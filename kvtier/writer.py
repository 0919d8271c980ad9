"""Write-behind from a child process (config ``writer: process``).

Why: writer threads in the engine's process share its GIL. Each chunk a thread writes takes
~16 system calls, each giving the GIL up and taking it back, and the engine's thread, which
gives the GIL up on every torch call, queues behind them. On the H200's host, enqueueing 3,000
CUDA ops while 32 chunks were written behind took 1.19x as long with threads, 0.95x with this
process; in a GPU vLLM engine the 8K cpu-tier hit went from 0.054-0.067 s to 0.040 s
(benchmarks/bench_writer_gil.py, gpu_vllm.py; docs/vllm.md "Benchmark (GPU engine)").

How: the store's host slots live in a ``memfd`` that both processes map. For each chunk the
parent sends (seq, slot, tiers, key) down a pipe and keeps its slot referenced; the child
writes the slot's bytes to those lower tiers from its own threads and answers (seq, which
tiers stored it) up another pipe; the parent then releases the slot. The child owns the write
side of the lower tiers (space, eviction); the parent keeps their read side. Chunks the
parent has leased are not known to the child, so the child's evictions may remove one: that
load then misses and is recomputed.

If the child dies, the parent's reader sees the pipe close, releases the slots it held and
the store goes on writing from its own threads (logged once): a tier failing never stops
the engine.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import queue
import struct
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

_CMD = struct.Struct("<IIBH")  # seq, slot, tier mask, key length; the key follows
_ACK = struct.Struct("<IB")  # seq, mask of the tiers that stored it


def shared_buffer(nbytes: int) -> tuple[int, mmap.mmap]:
    """An anonymous shared-memory file of ``nbytes`` (not /dev/shm: its size limit in containers
    does not apply) and its mapping; the descriptor is handed to the child."""
    fd = os.memfd_create("kvtier-pool", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, nbytes)
        return fd, mmap.mmap(fd, nbytes)
    except OSError:
        os.close(fd)
        raise


class WriterProcess:
    """The parent's end: a child process writing slots of a shared pool to the lower tiers.

    ``on_done(seq, stored_mask)`` runs on the reader thread for each chunk the child finished;
    ``on_lost(reason)`` once, when the child is gone (after which ``submit`` returns False).
    """

    def __init__(self, spec: dict, pool_fd: int, on_done: Callable[[int, int], None],
                 on_lost: Callable[[str], None]) -> None:
        cmd_r, self._cmd_w = os.pipe()
        ack_r, ack_w = os.pipe()
        spec = dict(spec, pool_fd=pool_fd, cmd_fd=cmd_r, ack_fd=ack_w)
        pkg_root = str(Path(__file__).resolve().parent.parent)
        env = dict(os.environ, CUDA_VISIBLE_DEVICES="",  # the child never touches a GPU
                   PYTHONPATH=os.pathsep.join([pkg_root, *filter(None, [os.environ.get("PYTHONPATH")])]))
        try:
            self.proc = subprocess.Popen([sys.executable, "-m", "kvtier.writer", json.dumps(spec)],
                                         pass_fds=(pool_fd, cmd_r, ack_w), stdin=subprocess.DEVNULL, env=env)
        except OSError:
            os.close(self._cmd_w)
            os.close(ack_r)
            raise
        finally:
            os.close(cmd_r)
            os.close(ack_w)
        self._on_done, self._on_lost = on_done, on_lost
        self._send_lock = threading.Lock()
        self.alive = True
        self._reader = threading.Thread(target=self._read_acks, args=(ack_r,), name="kvtier-writer-acks",
                                        daemon=True)
        self._reader.start()

    def submit(self, seq: int, slot: int, mask: int, key: bytes) -> bool:
        """Ask the child to write ``slot`` under ``key`` to the tiers in ``mask``; False if it is gone.

        Never blocks for long: the store keeps at most ``queue_depth`` chunks outstanding, far
        fewer bytes than a pipe holds."""
        msg = _CMD.pack(seq, slot, mask, len(key)) + key
        with self._send_lock:
            if not self.alive:
                return False
            try:
                os.write(self._cmd_w, msg)  # under PIPE_BUF bytes: written whole
                return True
            except OSError:
                return False

    def _read_acks(self, fd: int) -> None:
        with os.fdopen(fd, "rb") as f:
            while True:
                raw = f.read(_ACK.size)
                if len(raw) < _ACK.size:
                    break
                seq, mask = _ACK.unpack(raw)
                try:
                    self._on_done(seq, mask)
                except Exception:  # a bug in the callback must not stop the acks
                    log.exception("kvtier: handling a write-behind answer failed")
        with self._send_lock:
            self.alive = False
        code = self.proc.wait()
        self._on_lost(f"exit code {code}")

    def close(self, timeout: float) -> None:
        """End the child's input (it finishes what it has, then exits); kill it after ``timeout``."""
        with self._send_lock:
            if self._cmd_w >= 0:
                os.close(self._cmd_w)
                self._cmd_w = -1
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("kvtier: the writer process did not finish within %.0f s; killing it", timeout)
            self.proc.kill()
            self.proc.wait()
        self._reader.join(timeout)


def _child(spec: dict) -> int:
    """The child: write each requested slot to the lower tiers, answer which stored it."""
    import msgspec

    from kvtier.config import KVTierConfig
    from kvtier.layout import LayoutMsg, layout_from_msg
    from kvtier.tiers import make_tier
    from kvtier.tiers.base import never_protected

    config = KVTierConfig.from_dict(spec["config"])
    layout = layout_from_msg(msgspec.convert(spec["layout"], LayoutMsg))
    tiers = [make_tier(name, config, layout, spec["label"], never_protected) for name in spec["tiers"]]
    slot_bytes = spec["slot_bytes"]
    pool = memoryview(mmap.mmap(spec["pool_fd"], slot_bytes * spec["num_slots"]))
    ack_lock = threading.Lock()
    work: queue.Queue[tuple[int, int, int, bytes] | None] = queue.Queue()
    ack = os.fdopen(spec["ack_fd"], "wb", buffering=0)

    def write() -> None:
        while (item := work.get()) is not None:
            seq, slot, mask, key = item
            data = pool[slot * slot_bytes:(slot + 1) * slot_bytes]
            stored = 0
            for i, tier in enumerate(tiers):
                if mask >> i & 1:
                    try:
                        if tier.put([key], [data])[0]:
                            stored |= 1 << i
                    except Exception:  # a tier must not raise; if one does, that write failed
                        log.exception("kvtier writer: tier %s raised in put", tier.name)
            with ack_lock:
                try:
                    ack.write(_ACK.pack(seq, stored))
                except OSError:  # the parent is gone: its slots with it; finish the writes anyway
                    pass

    threads = [threading.Thread(target=write, daemon=True) for _ in range(config.write_threads)]
    for t in threads:
        t.start()
    with os.fdopen(spec["cmd_fd"], "rb") as cmds:
        while len(head := cmds.read(_CMD.size)) == _CMD.size:
            seq, slot, mask, klen = _CMD.unpack(head)
            work.put((seq, slot, mask, cmds.read(klen)))
    for _ in threads:
        work.put(None)
    for t in threads:
        t.join()
    for tier in tiers:
        tier.close()
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s kvtier-writer %(levelname)s %(message)s")
    sys.exit(_child(json.loads(sys.argv[1])))
