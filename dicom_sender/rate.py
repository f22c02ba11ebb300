"""A per-destination rate limit in bytes per second (a token bucket), for thin links at the edge.

``take(n)`` waits until ``n`` bytes may go out. The bucket holds at most one second of tokens,
so an idle link does not build up a burst; an object larger than that waits for its whole
size at the configured rate. ``clock`` and ``sleep`` are injectable for tests.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class RateLimiter:
    def __init__(
        self,
        bytes_per_s: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if bytes_per_s <= 0:
            raise ValueError("bytes_per_s must be positive")
        self.bytes_per_s = bytes_per_s
        self.clock = clock
        self._tokens = float(bytes_per_s)
        self._last = clock()

    def delay_for(self, nbytes: int) -> float:
        """Take ``nbytes`` now and return how long to wait before sending them (seconds)."""
        now = self.clock()
        self._tokens = min(float(self.bytes_per_s), self._tokens + (now - self._last) * self.bytes_per_s)
        self._last = now
        self._tokens -= nbytes
        return 0.0 if self._tokens >= 0 else -self._tokens / self.bytes_per_s

    def take(self, nbytes: int, stop: threading.Event | None = None) -> None:
        """Wait (interruptibly, when ``stop`` is given) until ``nbytes`` may be sent."""
        delay = self.delay_for(nbytes)
        if delay > 0:
            (stop or threading.Event()).wait(delay)
