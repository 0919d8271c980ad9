"""Calls into a tier with a deadline: the store's guard against a backend call that never returns.

Most tiers bound their own calls (the redis tier's socket timeout, local files). Mooncake's take no
timeout: a read from a segment holder whose host dropped off the network blocked 47-60 s here
(three network namespaces, one link down). A tier says how long a call may take
(:meth:`Tier.deadline`); :class:`DeadlineCalls` runs such calls on its own threads and stops
waiting then, so the engine's thread, or a parked load, waits at most that long.

A call that overran may still write into its destination buffers when it returns. Its slots are
held (:meth:`ChunkRef.share`) until then, so the pool cannot hand them to another chunk that the
late write would overwrite. Until it returns, the store skips the tier (misses): one hung call
per tier, not one per request.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import TYPE_CHECKING

from kvtier.memory import ChunkRef

if TYPE_CHECKING:
    from kvtier.tiers.base import Tier

log = logging.getLogger(__name__)

_THREADS = 8  # calls in flight at once across the tiers with deadlines (a hung one holds one)


class DeadlineCalls:
    """Tier calls bounded by the tier's deadline; ``on_overrun(tier_name)`` counts each overrun."""

    def __init__(self, on_overrun: Callable[[str], None]) -> None:
        self._on_overrun = on_overrun
        # Daemon threads of its own: a ThreadPoolExecutor's are joined at exit, and a hung call
        # would keep the process from exiting.
        self._work: queue.SimpleQueue = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._hung: dict[str, int] = {}  # tier name -> its calls still running past their deadline

    def hung(self, tier: str) -> bool:
        """A call of ``tier`` overran its deadline and has not returned yet."""
        return tier in self._hung

    def call(self, tier: str, fn: Callable[..., list], args: Sequence[object], limit: float,
             hold: Sequence[ChunkRef] = (), on_return: Callable[[], None] | None = None) -> list | None:
        """``fn(*args)``, or None if the call takes longer than ``limit`` seconds (the caller skips a
        :meth:`hung` tier); ``hold``: the slots the call writes into, kept from reuse until it returns;
        ``on_return``: called once the call is over, in time, raising or past its deadline (on the
        thread that ran it)."""
        future: Future = Future()
        if on_return is not None:
            future.add_done_callback(lambda _: self._hook(on_return))
        self._start_threads()
        self._work.put((future, fn, args))
        try:
            return future.result(limit)
        except FutureTimeout:
            pass
        kept = [ref.share() for ref in hold]
        with self._lock:
            self._hung[tier] = self._hung.get(tier, 0) + 1
        log.warning("kvtier: a %s call took longer than %.1fs; answering misses for that tier until it "
                    "returns (its %d destination slot(s) are held until then)", tier, limit, len(kept))
        self._on_overrun(tier)
        future.add_done_callback(lambda f: self._returned(tier, f, kept))
        return None

    def call_tier(self, tier: "Tier", op: str, args: Sequence[object], nbytes: int, hold: Sequence[ChunkRef] = (),
                  on_return: Callable[[], None] | None = None) -> list | None:
        """``tier.op(*args)`` moving ``nbytes``: through :meth:`call` where the tier sets that call a
        deadline (:meth:`Tier.deadline`), else on this thread. ``on_return`` runs once the call is
        over either way; what the tier raises, the caller gets."""
        handed = False
        try:
            limit = tier.deadline(op, nbytes)
            if limit is None:
                return getattr(tier, op)(*args)
            handed = True  # call() runs on_return
            return self.call(tier.name, getattr(tier, op), args, limit, hold, on_return)
        finally:
            if on_return is not None and not handed:
                self._hook(on_return)

    @staticmethod
    def _hook(on_return: Callable[[], None]) -> None:
        try:
            on_return()
        except Exception:  # noqa: BLE001 - the caller's hook; the call's own ending goes on
            log.exception("kvtier: a tier call's return hook raised")

    def _returned(self, tier: str, future: Future, kept: list[ChunkRef]) -> None:
        for ref in kept:
            ref.release()
        with self._lock:
            self._hung[tier] -= 1
            if not self._hung[tier]:
                del self._hung[tier]
        log.info("kvtier: the %s call that overran its deadline returned (%s)", tier,
                 "failed" if future.exception() is not None else "its answer dropped")

    def _start_threads(self) -> None:
        if len(self._threads) < _THREADS:
            with self._lock:
                while len(self._threads) < _THREADS:
                    t = threading.Thread(target=self._serve, name="kvtier-tier-call", daemon=True)
                    t.start()
                    self._threads.append(t)

    def _serve(self) -> None:
        while (item := self._work.get()) is not None:
            future, fn, args = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as e:  # noqa: BLE001 - the caller's future.result() raises it
                future.set_exception(e)

    def close(self) -> None:
        """Stop the threads that are idle; never waits for a hung call."""
        for _ in self._threads:
            self._work.put(None)
