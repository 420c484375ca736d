"""Rate limit: at most ``rate`` handler calls per second per group (token bucket).

Up to ``burst`` calls may go at once after a quiet period; beyond that, calls wait for tokens.
Waiting delays deliveries; it never fails them.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import anyio

from herald.middleware.base import CallNext, Middleware

if TYPE_CHECKING:
    from herald.context import Context

__all__ = ["RateLimit"]


class RateLimit(Middleware):
    def __init__(self, rate: float, burst: int | None = None) -> None:
        if rate <= 0:
            raise ValueError("RateLimit rate must be positive")
        self.rate = rate
        self.burst = burst if burst is not None else max(1, int(rate))
        if self.burst < 1:
            raise ValueError("RateLimit burst must be at least 1")
        self._tokens = float(self.burst)
        self._at = time.monotonic()
        self._lock = anyio.Lock()

    def for_group(self, topic: str, group: str) -> RateLimit:
        return RateLimit(self.rate, self.burst)

    async def handle(self, ctx: Context, call_next: CallNext) -> Any:
        async with self._lock:  # first come, first served
            now = time.monotonic()
            self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
            self._at = now
            if self._tokens < 1:
                await anyio.sleep((1 - self._tokens) / self.rate)
                self._tokens = 1.0
                self._at = time.monotonic()
            self._tokens -= 1
        return await call_next()
