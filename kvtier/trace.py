"""A timeline of kvtier's work inside an engine, for profiling: ``KVTIER_TRACE=/path/trace.jsonl``.

Every process of the engine (scheduler, workers) appends one JSON line per span:
``{"t": start, "dur": seconds, "name": ..., "pid": ..., "thread": ..., **fields}`` (``thread``: the
thread's name; kvtier's own threads are named ``kvtier-*``, everything else is the engine's). ``t`` is
``time.perf_counter()`` (CLOCK_MONOTONIC on Linux), so lines of different processes on one
host line up. ``cpu``: the thread's CPU time inside the span; ``dur`` well above it is time the
thread waited (for the GIL held by another thread of the process, or for a core). Lines are
buffered and written by :func:`flush` (the connector calls it after each hook). Off by default;
when off a span costs one attribute check. Python's garbage collections of at least
:data:`GC_MIN_S` are recorded too (``gc``, with the generation and the objects collected): a
collection holds the GIL, so every thread of the process stands still for it.

Where a step is late and no span says why, ``KVTIER_TRACE_SAMPLE_MS=5`` (with ``KVTIER_TRACE``)
samples the stacks of the main thread and of kvtier's load threads (:data:`SAMPLED_THREADS`) every
5 ms into a ring of the last 2 s. When the engine's next step comes at least :data:`GAP_S` after the
previous one (:func:`mark_step`, called at each step's close), the samples of the gap are written as
``sample`` lines: one per thread and run of equal stacks, with ``thread``, ``stack`` (innermost frame
first) and ``n`` samples. They show what the engine's thread was doing, or waiting in, while no hook
of kvtier's ran, and where a load thread waited meanwhile (on the H100 a parked load's enqueue took
188 ms of wall time for 4 ms of CPU while the engine's step stood still).

    KVTIER_TRACE=/tmp/kv.jsonl python3 my_serving_script.py
    python3 -m kvtier.trace /tmp/kv.jsonl        # per-name count, total, median, max
"""

from __future__ import annotations

import atexit
import gc
import json
import os
import statistics
import sys
import threading
import time
from collections import defaultdict, deque
from collections.abc import Iterator
from contextlib import contextmanager

_PATH = os.environ.get("KVTIER_TRACE") or None
ON = _PATH is not None
_fd: int | None = None
_lines: list[str] = []
_lock = threading.Lock()
_FLUSH_LINES = 512  # a safety bound; the connector flushes after each hook, outside the hook's time


def record(name: str, start: float, dur: float = 0.0, **fields: object) -> None:
    """Buffer one line. Writing is left to :func:`flush`: ``os.write`` releases the GIL, and on an
    engine thread taking it back can wait for another thread's switch interval (up to 5 ms), which
    a hook's measured time would then include (seen: p99 2.2 ms of waiting in a 0.07 ms hook)."""
    if not ON:
        return
    _lines.append(json.dumps({"t": start, "dur": dur, "name": name, "pid": os.getpid(),
                              "thread": threading.current_thread().name, **fields}) + "\n")
    if len(_lines) >= _FLUSH_LINES:
        flush()


def flush() -> None:
    """Write the buffered lines (one ``write`` on an O_APPEND file: lines of processes do not interleave)."""
    global _fd
    if not _lines:
        return
    with _lock:
        lines = _lines[:]
        del _lines[:len(lines)]
        if _fd is None:
            _fd = os.open(_PATH, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.write(_fd, "".join(lines).encode())


GC_MIN_S = 0.001  # shorter collections are not recorded (a young generation's take ~0.1 ms)
_gc_started: dict[int, float] = {}


def _on_gc(phase: str, info: dict) -> None:
    """``gc.callbacks`` hook: a ``gc`` line for each collection of at least :data:`GC_MIN_S`."""
    me = threading.get_ident()
    if phase == "start":
        _gc_started[me] = time.perf_counter()
        return
    t = _gc_started.pop(me, None)
    if t is not None and (dur := time.perf_counter() - t) >= GC_MIN_S:
        record("gc", t, dur, generation=info.get("generation"), collected=info.get("collected"))


def _after_fork_in_child() -> None:
    """A forked child (vLLM's engine process) starts with an empty buffer: the lines in it are the
    parent's, which writes them itself (inherited, they were written twice); so are the sampled
    stacks. Its lock may have been held by a thread that does not exist in the child, and no sampler
    thread survives the fork."""
    global _lock, _sampling
    _lines.clear()
    _gc_started.clear()
    _ring.clear()
    _lock = threading.Lock()
    _sampling = False


if ON:
    atexit.register(flush)
    gc.callbacks.append(_on_gc)
    os.register_at_fork(after_in_child=_after_fork_in_child)


SAMPLE_S = float(os.environ.get("KVTIER_TRACE_SAMPLE_MS") or 0) / 1e3 if ON else 0.0
GAP_S = 0.03  # a step this long after the previous one has its samples written
_RING_S = 2.0  # samples kept; a longer gap (an idle engine waiting for requests) is written in part
SAMPLED_THREADS = ("kvtier-load",)  # name prefixes of the threads sampled beside the main thread
_IDLE = "thread.py:_worker:"  # a load thread's innermost frame while its pool waits for work: not sampled
_RING_THREADS = 4  # ring room per sample: the main thread and up to three load threads
_ring: deque[tuple[float, str, tuple[str, ...]]] = deque(
    maxlen=max(1, int(_RING_S / SAMPLE_S) * _RING_THREADS) if SAMPLE_S else 1)
_last_step: float | None = None  # the previous mark_step's, of either side (both mark steps in one process)
_sampling = False  # this process's sampler is running


def _stack(frame, depth: int = 14) -> tuple[str, ...]:
    out = []
    while frame is not None and len(out) < depth:
        out.append(f"{os.path.basename(frame.f_code.co_filename)}:{frame.f_code.co_name}:{frame.f_lineno}")
        frame = frame.f_back
    return tuple(out)


def _sample_threads(main: int) -> None:
    names: dict[int, str] = {}
    while True:
        time.sleep(SAMPLE_S)
        frames = sys._current_frames()
        if any(i not in names for i in frames):  # a thread started: learn its name once
            names = {t.ident: t.name for t in threading.enumerate() if t.ident is not None}
        now = time.perf_counter()
        for ident, frame in frames.items():
            name = "MainThread" if ident == main else names.get(ident, "")
            if ident == main or name.startswith(SAMPLED_THREADS):
                stack = _stack(frame)
                if ident == main or not (stack and stack[0].startswith(_IDLE)):
                    _ring.append((now, name, stack))


def mark_step() -> None:
    """A step of the engine closed: if it came :data:`GAP_S` or more after the previous one, write
    the sampled threads' stacks of the gap (``sample`` lines). No-op unless sampling is on."""
    global _last_step
    if not SAMPLE_S:
        return
    now = time.perf_counter()
    start, _last_step = (now if _last_step is None else _last_step), now
    if now - start < GAP_S:
        return
    runs: dict[str, list[tuple[float, tuple[str, ...]]]] = {}  # per thread: the current run of equal stacks
    for t, thread, stack in [x for x in list(_ring) if start < x[0] <= now]:  # list(): a snapshot
        run = runs.setdefault(thread, [])
        if run and stack != run[-1][1]:
            _write_run(thread, run)
            run.clear()
        run.append((t, stack))
    for thread, run in runs.items():
        if run:
            _write_run(thread, run)


def _write_run(thread: str, run: list[tuple[float, tuple[str, ...]]]) -> None:
    first = run[0][0] - SAMPLE_S
    record("sample", first, run[-1][0] - first, thread=thread, stack=list(run[0][1]), n=len(run))


def start_sampling() -> bool:
    """Start this process's sampler of its main and load threads (once); False when sampling is off."""
    global _sampling
    if not SAMPLE_S or _sampling:
        return bool(SAMPLE_S)
    _sampling = True
    threading.Thread(target=_sample_threads, args=(threading.main_thread().ident,),
                     name="kvtier-trace-sampler", daemon=True).start()
    return True


@contextmanager
def span(name: str, **fields: object) -> Iterator[dict]:
    """Time the block; fields added to the yielded dict inside it are recorded too."""
    if not ON:
        yield fields
        return
    t, c = time.perf_counter(), time.thread_time()
    try:
        yield fields
    finally:
        record(name, t, time.perf_counter() - t, cpu=time.thread_time() - c, **fields)


def summarize(path: str) -> dict[str, dict[str, float]]:
    """Per span name: count, total, median, 99th percentile and max duration (seconds). Besides the
    spans, ``step_host.scheduler`` / ``step_host.worker``: kvtier's host time on the engine's thread
    per step (issue 28), the figure behind ``vllm:kvtier_step_host_seconds``."""
    durs: dict[str, list[float]] = defaultdict(list)
    waits: dict[str, list[float]] = defaultdict(list)
    with open(path) as f:
        for line in f:
            rec = json.loads(line)
            durs[rec["name"]].append(rec["dur"])
            if "cpu" in rec:
                waits[rec["name"]].append(max(0.0, rec["dur"] - rec["cpu"]))
    out = {}
    for name, d in sorted(durs.items()):
        out[name] = {"count": len(d), "total_s": sum(d), "median_s": statistics.median(d), "p99_s": _p99(d),
                     "max_s": max(d)}
        if waits[name]:  # the part of the span the thread spent not running
            out[name]["wait_p99_s"] = _p99(waits[name])
    return out


def _p99(values: list[float]) -> float:
    return sorted(values)[min(len(values) - 1, int(0.99 * len(values)))]


if __name__ == "__main__":
    for name, s in summarize(sys.argv[1]).items():
        print(f"{name:40} {s['count']:7d} {s['total_s'] * 1e3:10.2f} ms total {s['median_s'] * 1e3:9.3f} ms median "
              f"{s['p99_s'] * 1e3:9.3f} ms p99 {s['max_s'] * 1e3:9.3f} ms max"
              + (f" {s['wait_p99_s'] * 1e3:9.3f} ms p99 waiting" if "wait_p99_s" in s else ""))
