"""Handler registration: what a decorated function needs, worked out once when it is registered.

Everything that can be wrong with a handler — an annotation Herald cannot decode, a parameter
it cannot fill, two handlers of one group that would both claim the same event type — is an
error here, at import time, rather than a surprise on the first message.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, get_type_hints

from herald.codec import Decoder, decoder_for
from herald.context import Context
from herald.message import Message
from herald.transports.base import Start, validate_name

__all__ = ["GroupSpec", "Handler", "make_handler", "publishes_of"]

Filter = Callable[[Message], bool]
_PUBLISHES = "__herald_publishes__"


@dataclass(slots=True)
class Handler:
    """One registered handler function and how to call it."""

    func: Callable[..., Any]
    name: str
    decoder: Decoder
    wants_ctx: bool
    is_async: bool
    filter: Filter | None
    #: topics the return value is published to (from ``@app.publisher``); read at start-up
    publishes: tuple[str, ...] = ()
    #: an async handler of the event alone, called directly on the hot path
    plain: bool = False

    def bind(self) -> None:
        """Read the ``@publisher`` marks (in either decorator order) before consuming starts."""
        self.publishes = publishes_of(self.func)
        self.plain = self.is_async and not self.wants_ctx and not self.publishes


@dataclass(slots=True)
class GroupSpec:
    """All handlers of one group on one topic: they share one subscription and dispatch by type."""

    topic: str
    group: str
    concurrency: int
    ordered: bool
    start: Start
    prefetch: int
    #: the handlers' ``ctx.publish`` calls and the ack commit as one transaction
    transactional: bool = False
    #: engine routing patterns and an existing engine object (``Transport.subscribe``)
    bind: tuple[str, ...] = ()
    source: str | None = None
    handlers: list[Handler] = field(default_factory=list)

    def add(self, handler: Handler) -> None:
        for other in self.handlers:
            if other.filter is None and _overlaps(other.decoder, handler.decoder):
                raise TypeError(
                    f"handler {handler.name} can never run: {other.name} is registered first on "
                    f"topic {self.topic!r} group {self.group!r} for the same event types and has "
                    "no filter. Use another group, a filter=, or distinct event types."
                )
        self.handlers.append(handler)


def _overlaps(a: Decoder, b: Decoder) -> bool:
    if a.accepts is None or b.accepts is None:
        return True
    return bool(a.accepts & b.accepts)


def publishes_of(func: Callable[..., Any]) -> tuple[str, ...]:
    return tuple(getattr(func, _PUBLISHES, ()))


def mark_publisher(func: Callable[..., Any], topic: str) -> None:
    validate_name("topic", topic)
    targets = [*getattr(func, _PUBLISHES, ()), topic]
    try:
        setattr(func, _PUBLISHES, tuple(targets))
    except AttributeError as e:  # builtins, bound methods
        raise TypeError(f"@publisher cannot mark {func!r}; decorate a plain function") from e


def make_handler(
    func: Callable[..., Any], filter: Filter | None, localns: dict[str, Any] | None = None
) -> Handler:
    """Inspect ``func`` and build its :class:`Handler`. Raises ``TypeError`` on a bad signature.

    The first parameter not annotated ``Context`` receives the event, decoded by its
    annotation (unannotated: decoded JSON). A parameter annotated ``Context`` receives the
    delivery context. No other required parameters are allowed. ``localns`` resolves string
    annotations naming classes local to the function that registered the handler.
    """
    if not callable(func):
        raise TypeError(f"subscriber must decorate a function, got {func!r}")
    if filter is not None and not callable(filter):
        raise TypeError(f"filter= must be a callable taking a Message, got {filter!r}")
    name = f"{getattr(func, '__module__', '?')}.{getattr(func, '__qualname__', repr(func))}"
    try:
        hints = get_type_hints(func, localns=localns)
    except Exception as e:
        raise TypeError(f"cannot resolve the annotations of handler {name}: {e}") from e
    params = list(inspect.signature(func).parameters.values())
    event_param: inspect.Parameter | None = None
    wants_ctx = False
    for p in params:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if hints.get(p.name) is Context:
            wants_ctx = True
            continue
        if event_param is None:
            event_param = p
        elif p.default is p.empty:
            raise TypeError(
                f"handler {name} has a parameter {p.name!r} Herald cannot fill; a handler takes "
                "the event and optionally a parameter annotated Context"
            )
    if event_param is None:
        raise TypeError(f"handler {name} must take the event as its first parameter")
    if params[0] is not event_param:
        raise TypeError(f"handler {name}: the event must be the first parameter")
    if wants_ctx:
        ctx_params = [p for p in params if hints.get(p.name) is Context]
        if ctx_params[0] is not params[1] or len(ctx_params) > 1:
            raise TypeError(f"handler {name}: put the single Context parameter second")
    decoder = decoder_for(hints.get(event_param.name, Any))
    is_async = inspect.iscoroutinefunction(func)
    return Handler(func, name, decoder, wants_ctx, is_async, filter)
