"""Timeout: a handler call that takes longer than ``seconds`` fails with ``TimeoutError``.

The timeout counts as a transient failure, so the retry policy applies. An async handler is
cancelled at the deadline. A synchronous handler runs in a worker thread that Python cannot
interrupt: its call is failed at the deadline only once the thread returns.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import anyio

from herald.middleware.base import CallNext, Middleware

if TYPE_CHECKING:
    from herald.context import Context

__all__ = ["Timeout"]


class Timeout(Middleware):
    def __init__(self, seconds: float) -> None:
        if seconds <= 0:
            raise ValueError("Timeout seconds must be positive")
        self.seconds = seconds

    async def handle(self, ctx: Context, call_next: CallNext) -> Any:
        try:
            with anyio.fail_after(self.seconds):
                return await call_next()
        except TimeoutError as e:
            raise TimeoutError(
                f"handler {ctx.handler} took longer than {self.seconds:g}s on {ctx.message.id}"
            ) from e
