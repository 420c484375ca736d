"""Circuit breaker: stop hammering a dependency that keeps failing.

After ``failures`` consecutive failed calls the circuit *opens*: deliveries are delayed — held
before the handler, not failed, so they use up no attempts — for ``reset_after`` seconds. Then
one call goes through as a probe (*half-open*): success closes the circuit and lets everything
through; failure opens it again for another ``reset_after``. Each group has its own circuit.

Waiting deliveries keep their lease; keep ``reset_after`` well below the transport's visibility
timeout (30 s by default on SQLite) so they are not handed to another worker meanwhile.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Literal

import anyio

from herald.middleware.base import CallNext, Middleware

if TYPE_CHECKING:
    from herald.context import Context

__all__ = ["CircuitBreaker"]

State = Literal["closed", "open", "half-open"]


class CircuitBreaker(Middleware):
    def __init__(self, failures: int = 5, reset_after: float = 5.0) -> None:
        if failures < 1 or reset_after <= 0:
            raise ValueError("CircuitBreaker needs failures >= 1 and reset_after > 0")
        self.failures = failures
        self.reset_after = reset_after
        self._consecutive = 0
        self._opened_at = 0.0
        self._open = False
        self._probe = anyio.Lock()

    def for_group(self, topic: str, group: str) -> CircuitBreaker:
        return CircuitBreaker(self.failures, self.reset_after)

    @property
    def state(self) -> State:
        if not self._open:
            return "closed"
        if time.monotonic() - self._opened_at < self.reset_after:
            return "open"
        return "half-open"

    async def handle(self, ctx: Context, call_next: CallNext) -> Any:
        if not self._open:
            return await self._call(call_next)
        # open: wait out the rest of the open period, then go through one at a time as probes
        wait = self._opened_at + self.reset_after - time.monotonic()
        if wait > 0:
            await anyio.sleep(wait)
        async with self._probe:
            return await self._call(call_next)

    async def _call(self, call_next: CallNext) -> Any:
        try:
            result = await call_next()
        except Exception:
            self._consecutive += 1
            if self._open or self._consecutive >= self.failures:
                self._open = True  # (re)open: a failed probe starts a new open period
                self._opened_at = time.monotonic()
            raise
        self._consecutive = 0
        self._open = False
        return result
