"""Upcasting bus messages: a handler receives the current class even from an old producer.

A message published with an older ``schema_version`` header (or under an old type name) is
turned into the handler's current event class by the same :class:`EventRegistry` upcasters the
event store reads with::

    @app.subscriber("account")
    @upcasting(registry)
    async def on_deposit(e: MoneyDeposited, ctx: Context) -> None: ...

The wrapped handler takes the raw :class:`~herald.Message`, so it sees every type on the topic:
types that neither are nor upcast into its annotation are acked and ignored (as the App does
with an unhandled type); one that should but does not decode raises
:class:`~herald.eventsourcing.UnknownEvent`, a :class:`~herald.Permanent` error, so the message
is dead-lettered at once (reason ``permanent error``, ``dlq.error`` naming type and version) —
never silently dropped.
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Awaitable, Callable
from typing import Any, Union, get_args, get_origin, get_type_hints

from herald.codec import type_name
from herald.context import Context
from herald.eventsourcing.errors import UnknownEvent
from herald.eventsourcing.registry import EventRegistry
from herald.message import CONTENT_TYPE, SCHEMA_VERSION, Message

__all__ = ["upcasting"]

Handler = Callable[..., Awaitable[Any]]


def upcasting(registry: EventRegistry) -> Callable[[Handler], Handler]:
    """Decorate an async handler ``(event[, ctx])`` so old message shapes are upcast first."""

    def wrap(func: Handler) -> Handler:
        if not inspect.iscoroutinefunction(func):
            raise TypeError("@upcasting wraps async handlers")
        params = list(inspect.signature(func).parameters.values())
        hints = get_type_hints(func)
        if not params or params[0].name not in hints:
            raise TypeError(f"{func.__qualname__}: annotate the event parameter")
        ann = hints[params[0].name]
        classes = get_args(ann) if get_origin(ann) in (Union, types.UnionType) else (ann,)
        registry.register(*classes)
        accepted: set[str] = set()
        for cls in classes:
            accepted |= registry.sources_of(cls)
        wants_ctx = len(params) > 1

        async def handler(message: Message, ctx: Context) -> Any:
            t = message.type
            if t is None:
                if len(classes) != 1:
                    raise UnknownEvent("?", 0, "a message with no type header for a union")
                t = type_name(classes[0])
            elif t not in accepted:
                return None  # not an event this handler takes: acked, like an unhandled type
            raw_version = message.headers.get(SCHEMA_VERSION) or "1"
            try:
                version = int(raw_version)
            except ValueError:
                raise UnknownEvent(t, 0, f"bad schema_version header {raw_version!r}") from None
            event = registry.decode(t, version, message.payload, message.headers.get(CONTENT_TYPE))
            return await (func(event, ctx) if wants_ctx else func(event))

        handler.__module__ = func.__module__
        handler.__qualname__ = func.__qualname__
        handler.__name__ = func.__name__
        handler.__doc__ = func.__doc__
        return handler

    return wrap
