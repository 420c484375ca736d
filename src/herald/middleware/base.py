"""The middleware contract: code that wraps every handler call of a subscriber.

A middleware is an object with ``handle(ctx, call_next)``. It runs around the handler call
("onion" order: the first middleware of the list is the outermost) and either awaits
``call_next()`` — possibly several times, as :class:`~herald.middleware.retry.Retry` does — or
returns without calling it, which counts as handled (the delivery is acked), or raises, which
counts as a failure of the handler.

Middleware listed on the App applies to every subscriber, before (outside) a subscriber's own.
A middleware with per-subscriber state (a circuit breaker, a rate limit) gives each group its
own copy from :meth:`Middleware.for_group`.

The built-in failure path sits outside every middleware: an exception that leaves the chain is
redelivered with a delay or dead-lettered (see :mod:`herald.middleware.deadletter`). The chain
is skipped entirely when no middleware is configured, so the default costs nothing per message.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from herald.context import Context

__all__ = ["CallNext", "Middleware"]

CallNext = Callable[[], Awaitable[Any]]


class Middleware:
    """Base class: override :meth:`handle` (and :meth:`for_group` if the middleware has state)."""

    def for_group(self, topic: str, group: str) -> Middleware:
        """The instance to use for one group. Stateless middleware returns itself."""
        return self

    async def startup(self) -> None:
        """Called when the group's consumer starts (once per group instance)."""

    async def shutdown(self) -> None:
        """Called when the group's consumer has stopped."""

    async def before_ack(self) -> None:
        """Called before a batch of successfully handled deliveries is acked.

        Flush state that must be durable before the ack (the inbox records). If it raises, the
        batch is not acked; its deliveries are redelivered.
        """

    async def handle(self, ctx: Context, call_next: CallNext) -> Any:
        """Wrap one handler call. The default passes straight through."""
        return await call_next()
