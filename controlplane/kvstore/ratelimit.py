"""A token bucket that paces requests to one etcd cluster (qps with a burst)."""

from __future__ import annotations

import asyncio
import time


class RateLimiter:
    """Allows ``qps`` requests per second on average and ``burst`` at once.

    Waiters are served in arrival order: each reserves the next token time, so a burst of
    callers is spread evenly instead of waking together.
    """

    def __init__(self, qps: float, burst: int = 0) -> None:
        if qps <= 0:
            raise ValueError("qps must be positive")
        self._interval = 1.0 / qps
        self._burst = max(1, burst or int(qps))
        self._tokens = float(self._burst)
        self._stamp = time.monotonic()
        self.waited_seconds = 0.0

    async def acquire(self) -> None:
        now = time.monotonic()
        self._tokens = min(self._burst, self._tokens + (now - self._stamp) / self._interval)
        self._stamp = now
        self._tokens -= 1.0
        if self._tokens >= 0:
            return
        delay = -self._tokens * self._interval
        self.waited_seconds += delay
        await asyncio.sleep(delay)
