"""A circuit breaker for a remote tier's server: after a failure, answer misses without
touching the network for ``retry_after_s``, then let one caller probe (redis, mooncake)."""

from __future__ import annotations

import threading
import time


class Breaker:
    """Closed (0.0) or open until a monotonic time; after it, one caller probes."""

    def __init__(self, retry_after_s: float) -> None:
        self.retry_after_s = retry_after_s
        self.open_until = 0.0
        self._lock = threading.Lock()

    def allow(self) -> bool:
        if self.open_until == 0.0:
            return True
        with self._lock:
            now = time.monotonic()
            if now < self.open_until:
                return False
            self.open_until = now + self.retry_after_s  # this caller probes; others wait
            return True

    def success(self) -> None:
        self.open_until = 0.0

    def failure(self) -> None:
        self.open_until = time.monotonic() + self.retry_after_s

    @property
    def is_open(self) -> bool:
        return self.open_until != 0.0
