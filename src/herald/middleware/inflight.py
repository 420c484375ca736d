"""Max in flight: bound the handler calls running at once.

Listed on the App, one limit is shared by every group of the process (protecting a shared
resource such as a database pool); listed on a subscriber, it bounds that group alone. Each
transport's ``prefetch`` bounds what is fetched ahead; this bounds what runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import anyio

from herald.middleware.base import CallNext, Middleware

if TYPE_CHECKING:
    from herald.context import Context

__all__ = ["MaxInFlight"]


class MaxInFlight(Middleware):
    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("MaxInFlight limit must be at least 1")
        self.limit = limit
        self._limiter = anyio.CapacityLimiter(limit)

    @property
    def in_flight(self) -> int:
        return int(self._limiter.borrowed_tokens)

    async def handle(self, ctx: Context, call_next: CallNext) -> Any:
        async with self._limiter:
            return await call_next()
