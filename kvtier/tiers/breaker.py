"""A circuit breaker for a remote tier's server: after a failure, answer misses without
touching the network for ``retry_after_s``, then probe the server again (redis, mooncake).

With a ``probe`` (a call that asks the server whether it answers), the probing is done by a
background thread, never by a caller: a caller may be the engine's thread (a scheduler lookup),
and a probe of a host that is gone costs a whole connect timeout. Without one, the first caller
after ``retry_after_s`` is let through as the probe.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class Breaker:
    """Closed (0.0) or open until a monotonic time."""

    def __init__(self, retry_after_s: float, probe: Callable[[], bool] | None = None) -> None:
        self.retry_after_s = retry_after_s
        self.open_until = 0.0
        self._probe = probe
        self._prober: threading.Thread | None = None
        self._closed = threading.Event()  # the tier closed: no more probes
        self._lock = threading.Lock()

    def allow(self) -> bool:
        if self.open_until == 0.0:
            return True
        if self._probe is not None:
            return False  # the prober closes the breaker once the server answers
        with self._lock:
            now = time.monotonic()
            if now < self.open_until:
                return False
            self.open_until = now + self.retry_after_s  # this caller probes; others wait
            return True

    def success(self) -> None:
        self.open_until = 0.0

    def failure(self) -> None:
        with self._lock:
            self.open_until = time.monotonic() + self.retry_after_s
            if self._probe is None or self._closed.is_set() or (self._prober is not None and self._prober.is_alive()):
                return
            self._prober = threading.Thread(target=self._probe_until_closed, name="kvtier-breaker-probe", daemon=True)
            self._prober.start()

    def _probe_until_closed(self) -> None:
        while not self._closed.is_set():
            wait = self.open_until - time.monotonic()
            if self.open_until == 0.0:
                return  # closed meanwhile (a call through another path succeeded)
            if wait > 0 and self._closed.wait(wait):
                return
            try:
                ok = bool(self._probe())
            except Exception:  # noqa: BLE001 - any failure of the probe: still down
                ok = False
            if ok:
                self.success()
                return
            self.open_until = time.monotonic() + self.retry_after_s

    def close(self) -> None:
        """Stop probing (the tier is closing)."""
        self._closed.set()

    @property
    def is_open(self) -> bool:
        return self.open_until != 0.0
