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
the engine. A put that overruns its tier's deadline (:meth:`Tier.deadline`: Mooncake's puts
to a holder that stopped answering block until it answers) is left running: the child skips
that tier until the call returns and writes on to the others, and answers for that chunk only
then, so the parent keeps its slot while the late call may still read it.

The parent never blocks on the child: commands go down a non-blocking pipe, and what a
stopped child leaves unread waits in a backlog the ack reader pushes on as the child goes
on (issue 29.6: a blocking write into the full 64 KiB pipe stopped ``Store.put``). The
child's spec (the config: Redis password, server token) comes through an inherited memfd,
never its command line, which every local user can read in ``/proc``.
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
import time
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
        spec_fd = _spec_file(spec)
        pkg_root = str(Path(__file__).resolve().parent.parent)
        env = dict(os.environ, CUDA_VISIBLE_DEVICES="",  # the child never touches a GPU
                   PYTHONPATH=os.pathsep.join([pkg_root, *filter(None, [os.environ.get("PYTHONPATH")])]))
        try:
            self.proc = subprocess.Popen([sys.executable, "-m", "kvtier.writer", str(spec_fd)],
                                         pass_fds=(pool_fd, cmd_r, ack_w, spec_fd), stdin=subprocess.DEVNULL,
                                         env=env)
        except OSError:
            os.close(self._cmd_w)
            os.close(ack_r)
            raise
        finally:
            os.close(cmd_r)
            os.close(ack_w)
            os.close(spec_fd)
        os.set_blocking(self._cmd_w, False)
        self._backlog = bytearray()  # commands the pipe had no room for (a stopped or slow child)
        self._on_done, self._on_lost = on_done, on_lost
        self._send_lock = threading.Lock()
        self.alive = True
        self._reader = threading.Thread(target=self._read_acks, args=(ack_r,), name="kvtier-writer-acks",
                                        daemon=True)
        self._reader.start()

    def submit(self, seq: int, slot: int, mask: int, key: bytes) -> bool:
        """Ask the child to write ``slot`` under ``key`` to the tiers in ``mask``; False if it is gone.

        Never blocks: what the pipe has no room for waits in a backlog (at most the store's
        ``queue_depth`` commands). True also when the child dies before reading it: the
        store then counts every chunk it sent as lost (``on_lost``)."""
        msg = _CMD.pack(seq, slot, mask, len(key)) + key
        with self._send_lock:
            if not self.alive or self._cmd_w < 0:
                return False
            self._backlog += msg
            self._push()
            return True

    def _push(self) -> bool:
        """Write what the pipe takes of the backlog (send lock held); True when it is empty."""
        while self._backlog:
            try:
                n = os.write(self._cmd_w, self._backlog)
            except BlockingIOError:
                return False
            except OSError:  # the child is gone: the ack reader will see it and count the losses
                self._backlog.clear()
                return True
            del self._backlog[:n]
        return True

    def _read_acks(self, fd: int) -> None:
        with os.fdopen(fd, "rb") as f:
            while True:
                raw = f.read(_ACK.size)
                if len(raw) < _ACK.size:
                    break
                seq, mask = _ACK.unpack(raw)
                if self._backlog:  # the child read some commands: room in the pipe again
                    with self._send_lock:
                        if self._cmd_w >= 0:
                            self._push()
                try:
                    self._on_done(seq, mask)
                except Exception:  # a bug in the callback must not stop the acks
                    log.exception("kvtier: handling a write-behind answer failed")
        with self._send_lock:
            self.alive = False
        code = self.proc.wait()
        self._on_lost(f"exit code {code}")

    def close(self, timeout: float) -> None:
        """End the child's input (it finishes what it has, then exits); kill it after ``timeout``
        (in all: a stopped child took twice ``timeout`` before)."""
        deadline = time.monotonic() + timeout
        while True:  # the backlog first, while there is time
            with self._send_lock:
                if self._cmd_w < 0 or self._push() or time.monotonic() >= deadline:
                    if self._cmd_w >= 0:
                        os.close(self._cmd_w)
                        self._cmd_w = -1
                    break
            time.sleep(0.005)
        try:
            self.proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("kvtier: the writer process did not finish within %.0f s; killing it", timeout)
            self.proc.kill()
            self.proc.wait()
        self._reader.join(max(0.1, deadline - time.monotonic()))


def _spec_file(spec: dict) -> int:
    """A memfd holding ``spec`` as JSON, read from the start by the child."""
    fd = os.memfd_create("kvtier-writer-spec", os.MFD_CLOEXEC)
    try:
        data = json.dumps(spec).encode()
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.lseek(fd, 0, os.SEEK_SET)
        return fd
    except OSError:
        os.close(fd)
        raise


class _Chunk:
    """One chunk's write in the child: answered once every tier's put returned, the late ones
    (past their deadline, their answer dropped) included, so the parent holds the slot until then."""

    def __init__(self, seq: int, answer: Callable[[int, int], None]) -> None:
        self.seq, self.answer = seq, answer
        self.stored = 0  # mask of the tiers that stored it in time
        self._open = 1  # the writing thread, until it is through the tiers, and each put running
        self._lock = threading.Lock()

    def hold(self) -> None:
        """A put starts: the chunk is not answered before it returns (one past its deadline included)."""
        with self._lock:
            self._open += 1

    def release(self) -> None:
        """A put returned, or the writing thread is through the tiers; the last one answers."""
        with self._lock:
            self._open -= 1
            last = self._open == 0
        if last:
            self.answer(self.seq, self.stored)


def _child(spec: dict) -> int:
    """The child: write each requested slot to the lower tiers, answer which stored it."""
    import msgspec

    from kvtier.config import KVTierConfig
    from kvtier.layout import LayoutMsg, layout_from_msg
    from kvtier.tiers import make_tier
    from kvtier.tiers.base import never_protected
    from kvtier.tiers.calls import DeadlineCalls

    # The engine process adds its Mooncake segment to the pool; this child only writes into it.
    config = KVTierConfig.from_dict({**spec["config"], "mooncake_segment_bytes": 0})
    layout = layout_from_msg(msgspec.convert(spec["layout"], LayoutMsg))
    tiers = [make_tier(name, config, layout, spec["label"], never_protected) for name in spec["tiers"]]
    slot_bytes = spec["slot_bytes"]
    pool = memoryview(mmap.mmap(spec["pool_fd"], slot_bytes * spec["num_slots"]))
    for tier in tiers:
        tier.register_memory(pool)
    ack_lock = threading.Lock()
    work: queue.Queue[tuple[int, int, int, bytes] | None] = queue.Queue()
    ack = os.fdopen(spec["ack_fd"], "wb", buffering=0)
    deadlines = DeadlineCalls(on_overrun=lambda name: None)  # it logs each overrun itself

    def answer(seq: int, stored: int) -> None:
        with ack_lock:
            try:
                ack.write(_ACK.pack(seq, stored))
            except OSError:  # the parent is gone: its slots with it; finish the writes anyway
                pass

    def write() -> None:
        while (item := work.get()) is not None:
            seq, slot, mask, key = item
            data = pool[slot * slot_bytes:(slot + 1) * slot_bytes]
            chunk = _Chunk(seq, answer)
            for i, tier in enumerate(tiers):
                if not mask >> i & 1 or deadlines.hung(tier.name):
                    continue
                chunk.hold()  # released when the put is over: in time, raising, or past its deadline
                try:
                    got = deadlines.call_tier(tier, "put", ([key], [data]), len(data), on_return=chunk.release)
                    if got is not None and got[0]:
                        chunk.stored |= 1 << i
                except Exception:  # a tier must not raise; if one does, that write failed
                    log.exception("kvtier writer: tier %s raised in put", tier.name)
            chunk.release()

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
    with os.fdopen(int(sys.argv[1]), "rb") as spec_file:
        child_spec = json.loads(spec_file.read())
    sys.exit(_child(child_spec))
