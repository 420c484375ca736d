"""Which message caused the events being saved: correlation and causation for stored events.

A command handler run by :class:`~herald.eventsourcing.Commands` sets the current
:class:`~herald.Context`; :meth:`Repository.save` reads it when it is not given one, so the
stored events (and the bus messages the relay makes of them) carry the command's
``correlation_id`` and have the command's id as ``causation_id``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from herald.context import Context
from herald.message import CAUSATION_ID, CORRELATION_ID

__all__ = ["causal_headers", "caused_by", "current_context"]

_current: ContextVar[Context | None] = ContextVar("herald_es_context", default=None)


def current_context() -> Context | None:
    """The delivery being handled by the command handler running in this task, if any."""
    return _current.get()


@contextmanager
def caused_by(ctx: Context | None) -> Iterator[None]:
    """Within the block, events saved without an explicit context are caused by ``ctx``."""
    token = _current.set(ctx)
    try:
        yield
    finally:
        _current.reset(token)


def causal_headers(ctx: Context | None) -> dict[str, str]:
    """``correlation_id`` and ``causation_id`` linking stored events to ``ctx``'s message."""
    if ctx is None:
        return {}
    return {CORRELATION_ID: ctx.correlation_id, CAUSATION_ID: ctx.message.id}
