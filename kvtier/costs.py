"""What a hit costs: reading its chunks from the tiers against computing its tokens.

A hit is a win only when loading it is faster than recomputing it on this engine: an
H200 prefills Llama-8B at ~5 GB/s of KV, faster than a disk without its page cache
(~1.7 GB/s) or Redis (~0.5 GB/s). :class:`CostModel` keeps both sides, measured online:

- **Reads**: seconds per chunk of each tier, an exponential average over the store's
  real batched reads (``observe_read``), plus a fixed copy cost per chunk into the
  engine's cache. Before a tier was read, a conservative seed (:data:`SEED_READ_GBPS`);
  background promotions read the slow tiers too, so the seed is soon replaced. The disk is two
  tiers here: ``disk`` (its device) and ``disk~cached`` (its files in the page cache, ~10x
  faster), told apart by a probe of the first and last chunk's files, both when a read is timed
  and when a hit is costed (``Store.cost_tiers``): reads the page cache served never make a cold
  hit look cheap (on an H100, four cold 32K-token hits took 2-8x their compute that way).
- **Compute**: step time = ``c + a * tokens + b * attention + d * context``, fitted by least
  squares over the engine's recent steps (``observe_step``). Attention is two terms because it
  costs two ways: a request computing a tile of queries or more (:data:`QUERY_TILE`) is
  compute-bound, ``attention`` sums its new tokens x their mean context; one with fewer (a
  decode) reads its whole context's KV for them, ``context`` sums its context length. On an H100
  (Llama-8B shape) the read costs ~4e-8 s per token of context, the compute ~5e-10 s per
  token-context pair: fitted as one term over a window of mostly decode steps, a 32K-token
  prefill was estimated at 7.7 s instead of 1.2 s, and cold disk hits were loaded for it. A hit's
  compute is estimated from ``c``, ``a`` and ``b`` only. Before enough prefill steps were seen, a
  seed rate in GB/s of KV (config ``prefill_gbps``).
- **Backlog**: reads already promised to a tier delay the next load from it.
- **Overhead**: a load has a fixed cost beside its reads (a parked request waits a scheduling
  round trip), measured by the scheduler: the wait of each parked load from its allocation until
  the engine reports it finished, plus the time since the engine last planned a step, less its
  predicted reads (``observe_load_wait``); a sample rises at most 50 ms above the estimate (one
  stall must not stop loads, after which none would be measured to correct it).

:meth:`CostModel.chunks_to_load` picks how many leading chunks of a hit to load so that
load + compute of the rest is least. It only ever shortens a hit: whatever it answers,
the engine computes the tokens not loaded, so a wrong estimate costs time, never tokens.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Iterable, Sequence

import numpy as np

# Read speeds assumed before a tier was measured (GB/s of chunk payload). Low on purpose:
# loading from a slow tier makes serving slower, a missed win only leaves it as fast.
# A tier whose reads come from the page cache or from its device at very different speeds (the disk)
# is timed, and its hits are costed, under two names: "disk" (the device) and "disk~cached".
CACHED = "~cached"
SEED_READ_GBPS = {"cpu": 1000.0, "disk": 2.0, f"disk{CACHED}": 8.0, "redis": 0.5, "server": 10.0}
# Host -> engine cache copy (GB/s): PCIe on a GPU, a memory copy on CPU.
COPY_GBPS = {"cuda": 25.0, "cpu": 5.0}
# Fixed cost of one load beside its reads, until parked loads measured it (``observe_load_wait``):
# a parked request waits a scheduling round trip or two. On the H200 a whole 8K cpu-tier hit takes
# 0.033 s where its copy is ~0.02 s; loads of a chunk or two that save less than this were seen to
# cost more than they saved (docs/vllm.md).
LOAD_OVERHEAD_S = {"cuda": 0.015, "cpu": 0.0}
_MAX_LOAD_OVERHEAD_S = 1.0  # a sample past this is a stall, not what a load costs
# A sample counts for at most this much above the estimate: one stall (a GC pause, a compile) then
# moves it by a quarter of this, and loads that keep waiting longer still raise it, step by step.
_MAX_OVERHEAD_RISE_S = 0.05
# Default prefill speed (GB/s of KV computed) until measured.
SEED_PREFILL_GBPS = {"cuda": 5.0, "cpu": 0.05}
_READ_WEIGHT = 0.25  # weight of a new read in the running average
_STEPS_KEPT = 256  # engine steps the compute fit uses
_MIN_PREFILL_STEPS = 4  # steps with at least a chunk of new tokens, not all decodes, before the fit is trusted
# Flash attention computes a request's queries in tiles: below one tile, its attention costs the read
# of its context's KV (``context`` of a step), from one tile up the products (``attention``).
QUERY_TILE = 64
_REFIT_EVERY = 8


class CostModel:
    """Online estimates of read and compute times for one store's chunks (thread-safe)."""

    def __init__(self, chunk_size: int, chunk_bytes: int, device: str = "cpu", prefill_gbps: float = 0.0,
                 max_step_tokens: int = 8192) -> None:
        self.chunk_size = chunk_size
        self.chunk_bytes = chunk_bytes
        self.max_step_tokens = max(1, max_step_tokens)
        self.copy_s = chunk_bytes / (COPY_GBPS.get(device, 5.0) * 1e9)
        self.load_overhead_s = LOAD_OVERHEAD_S.get(device, 0.0)
        rate = prefill_gbps or SEED_PREFILL_GBPS.get(device, 0.05)
        self._seed_token_s = chunk_bytes / chunk_size / (rate * 1e9)
        self._lock = threading.Lock()
        self._read_s: dict[str, float] = {}
        self._busy_until: dict[str, float] = {}
        self._steps: deque[tuple[int, float, float, float]] = deque(maxlen=_STEPS_KEPT)
        self._new_steps = 0
        self._fit: tuple[float, float, float, float] | None = None  # (c, a, b, d) once trusted
        # Observations for the scheduler's model when it lives in another process (take_observations);
        # bounded: an engine that never asks for them (or shares this model) loses only old ones.
        self._outbox: deque[tuple] = deque(maxlen=1024)

    # ------------------------------------------------------------ observations
    def observe_read(self, tier: str, chunks: int, seconds: float) -> None:
        """A batched read of ``chunks`` chunks from ``tier`` took ``seconds``."""
        if chunks <= 0 or seconds <= 0:
            return
        per = seconds / chunks
        with self._lock:
            old = self._read_s.get(tier)
            self._read_s[tier] = per if old is None else old + _READ_WEIGHT * (per - old)
            self._outbox.append(("read", tier, chunks, seconds))

    def observe_load_wait(self, waited_s: float, predicted_reads_s: float) -> None:
        """A parked load's request waited ``waited_s`` from its allocation until it could be
        scheduled (the load's report plus one step); its reads were predicted at
        ``predicted_reads_s``: the rest is the overhead."""
        with self._lock:
            sample = min(max(0.0, waited_s - predicted_reads_s), _MAX_LOAD_OVERHEAD_S,
                         self.load_overhead_s + _MAX_OVERHEAD_RISE_S)
            self.load_overhead_s += _READ_WEIGHT * (sample - self.load_overhead_s)

    def observe_step(self, tokens: int, attention: float, seconds: float, context: float = 0.0) -> None:
        """An engine step computed ``tokens`` new tokens with ``attention`` token-context products (of
        requests computing a tile of queries or more) and ``context`` tokens of context read (by the
        others: decodes)."""
        if tokens <= 0 or seconds <= 0:
            return
        with self._lock:
            self._steps.append((tokens, attention, context, seconds))
            self._new_steps += 1
            self._outbox.append(("step", tokens, attention, seconds, context))

    def take_observations(self) -> list[tuple]:
        """Observations since the last call, for a model in another process (:meth:`absorb`)."""
        with self._lock:
            out = list(self._outbox)
            self._outbox.clear()
        return out

    def absorb(self, observations: Iterable[Sequence]) -> None:
        """Add another process's observations (a worker's reads and steps, seen by the scheduler)."""
        for kind, *args in observations:
            if kind == "read":
                self.observe_read(*args)
            elif kind == "step":
                self.observe_step(*args)

    # ------------------------------------------------------------ estimates
    def read_s(self, tier: str) -> float:
        """Seconds to have one chunk of ``tier`` in the engine's cache (read + copy)."""
        per = self._read_s.get(tier)
        if per is None:
            per = self.chunk_bytes / (SEED_READ_GBPS.get(tier, 0.5) * 1e9)
        return per + self.copy_s

    def _coefficients(self) -> tuple[float, float, float]:
        """(c, a, b) of computing a hit's tokens; d, the decodes' reads of their context, is no part of it."""
        with self._lock:
            if self._new_steps >= _REFIT_EVERY or (self._fit is None and self._new_steps):
                self._new_steps = 0
                fit = _fit_steps(list(self._steps), self.chunk_size)
                if fit is not None:
                    self._fit = fit
            if self._fit is not None:
                return self._fit[:3]
        return 0.0, self._seed_token_s, 0.0

    def compute_s(self, start: int, end: int) -> float:
        """Seconds the engine needs to compute tokens ``[start, end)`` with ``start`` already cached."""
        if end <= start:
            return 0.0
        c, a, b = self._coefficients()
        steps = math.ceil((end - start) / self.max_step_tokens)
        return steps * c + a * (end - start) + b * (end * end - start * start) / 2

    def backlog_s(self, tier: str, now: float | None = None) -> float:
        """Seconds of reads already promised to ``tier``."""
        now = time.monotonic() if now is None else now
        return max(0.0, self._busy_until.get(tier, 0.0) - now)

    def chunks_to_load(self, start: int, chunk_tiers: Sequence[str], end: int, limit: int,
                       ahead: int = 0) -> tuple[int, float, float]:
        """How many of the hit's chunks to load: (chunks, predicted load s, predicted compute s saved).

        The request has ``start`` tokens computed; chunk ``i`` of the hit (tokens from
        ``(start // chunk_size + i) * chunk_size``) is in tier ``chunk_tiers[i]``; the prompt
        ends at ``end``; a load ends at ``limit`` tokens at most. Loading ``k`` chunks costs
        their reads (after each tier's backlog) and saves computing the tokens they cover.
        ``ahead``: tokens that other requests admitted in the same scheduling round compute in the
        step this one would be computed in. Computed, its first token waits for theirs too; loaded,
        it runs in a later step. (On an H100 a burst of 32 requests with cached 1K-token prompts,
        each weighed alone, was computed in four 8K-token steps of ~190 ms, where loading them
        would have taken one round trip and ~80 ms of copies.)
        Vectorized over the chunks: a 32K-token hit is decided in tens of microseconds.
        """
        c = self.chunk_size
        first = start // c
        stops = np.minimum((first + 1 + np.arange(len(chunk_tiers))) * c, limit)
        n = int(np.searchsorted(stops, limit)) + 1 if len(stops) and stops[-1] >= limit else len(stops)
        stops = stops[:n]
        if n == 0 or stops[-1] <= start:
            return 0, 0.0, 0.0
        now = time.monotonic()
        per_tier = {t: (self.read_s(t), self.backlog_s(t, now)) for t in set(chunk_tiers[:n])}
        costs = np.array([per_tier[t] for t in chunk_tiers[:n]])
        load = self.load_overhead_s + np.cumsum(costs[:, 0]) + np.maximum.accumulate(costs[:, 1])
        c0, a, b = self._coefficients()
        steps_full = math.ceil((end - start) / self.max_step_tokens)
        rest = end - stops
        saved = (steps_full - np.ceil(rest / self.max_step_tokens)) * c0 + a * (stops - start) \
            + b * (stops.astype(np.float64) ** 2 - start * start) / 2 + a * ahead
        gain = saved - load
        best = n - 1 - int(np.argmax(gain[::-1]))  # the most chunks among equal gains: less work for the engine
        if gain[best] < 0:
            return 0, 0.0, 0.0
        return best + 1, float(load[best]), float(saved[best])

    def snapshot(self, tiers: Iterable[str]) -> dict[str, object]:
        """What the model assumes now (for traces): per tier of ``tiers`` the read time of a chunk in
        ms (``measured``: from real reads, else the seed) and the backlog in ms; the compute fit
        (c s, a s/token, b s/token^2, d s/token of decode context; None while the seed rate stands) and the
        load overhead in ms."""
        now = time.monotonic()
        names = sorted(set(tiers))
        return {"read_ms": {t: round(self.read_s(t) * 1e3, 4) for t in names},
                "measured": [t for t in names if t in self._read_s],
                "backlog_ms": {t: round(self.backlog_s(t, now) * 1e3, 3) for t in names},
                "fit": self._fit, "overhead_ms": round(self.load_overhead_s * 1e3, 3)}

    def promise(self, tier_chunks: dict[str, int]) -> None:
        """Loads were decided: count their reads as each tier's backlog."""
        now = time.monotonic()
        with self._lock:
            for tier, n in tier_chunks.items():
                if tier == "cpu" or n <= 0:
                    continue
                start = max(now, self._busy_until.get(tier, 0.0))
                self._busy_until[tier] = start + n * self.read_s(tier)


def _fit_steps(steps: list[tuple[int, float, float, float]],
               chunk_size: int) -> tuple[float, float, float, float] | None:
    """Least-squares (c, a, b, d) of seconds = c + a * tokens + b * attention + d * context, all >= 0,
    from (tokens, attention, context, seconds) steps; None when too few steps computed a chunk or more
    (decode steps alone do not tell the per-token cost)."""
    # A step of a chunk or more that is all decodes (context, no attention: a large batch) tells nothing
    # of a prefill's attention; one that tells neither (a caller counting tokens only) is taken as a prefill.
    if sum(1 for t, att, ctx, _ in steps if t >= chunk_size and (att > 0 or not ctx)) < _MIN_PREFILL_STEPS:
        return None
    x = np.array([(1.0, t, att, ctx) for t, att, ctx, _ in steps])
    y = np.array([s for *_, s in steps])
    cols = [0, 1, 2, 3]
    while cols:  # drop a term fitted negative, then fit again without it
        coef, *_ = np.linalg.lstsq(x[:, cols], y, rcond=None)
        neg = [cols[i] for i, v in enumerate(coef) if v < 0]
        if not neg:
            out = [0.0, 0.0, 0.0, 0.0]
            for i, v in zip(cols, coef):
                out[i] = float(v)
            return (out[0], out[1], out[2], out[3]) if out[1] > 0 or out[2] > 0 else None
        cols = [i for i in cols if i not in neg]
    return None


class StepClock:
    """Times the engine's steps for :meth:`CostModel.observe_step`: on a GPU with events on the
    forward's stream, read back steps later without waiting; on CPU with the host clock."""

    _MAX_PENDING = 64  # steps not yet finished on the device; older ones are given up

    def __init__(self, device, observe) -> None:
        """``device``: the engine's cache device (None: time nothing); ``observe(tokens, attention, s, context)``
        (as :meth:`CostModel.observe_step`)."""
        self._observe = observe if device is not None else None
        self._device = device
        self._cuda = device is not None and device.type == "cuda"
        self._open: tuple | None = None
        self._pending: deque[tuple] = deque()
        self._spare: list = []

    def start(self, tokens: int, attention: float, context: float = 0.0) -> None:
        """A forward that computes ``tokens`` new tokens begins (called before its first layer)."""
        self._open = None
        if self._observe is None or tokens <= 0:
            return
        self._poll()
        self._open = (tokens, attention, context, self._mark())

    def stop(self) -> None:
        """The forward's work is issued (after its last layer)."""
        if self._open is None:
            return
        tokens, attention, context, begin = self._open
        self._open = None
        if not self._cuda:
            self._observe(tokens, attention, time.perf_counter() - begin, context)
            return
        self._pending.append((tokens, attention, context, begin, self._mark()))
        if len(self._pending) > self._MAX_PENDING:
            *_, a, b = self._pending.popleft()
            self._spare += [a, b]

    def _mark(self):
        if not self._cuda:
            return time.perf_counter()
        import torch

        event = self._spare.pop() if self._spare else torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self._device))
        return event

    def _poll(self) -> None:
        while self._pending and self._pending[0][-1].query():
            tokens, attention, context, begin, end = self._pending.popleft()
            self._observe(tokens, attention, begin.elapsed_time(end) / 1e3, context)
            self._spare += [begin, end]
