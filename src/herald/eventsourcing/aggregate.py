"""Aggregates: state rebuilt from their own events.

::

    class Account(Aggregate):
        balance: int = 0

        def deposit(self, amount: int) -> None:
            if amount <= 0:
                raise Rejected("amount must be positive")
            self.record(MoneyDeposited(amount=amount))     # applied now, stored on save

        def on_money_deposited(self, e: MoneyDeposited) -> None:
            self.balance += e.amount

A method whose name starts with ``on_`` and whose event parameter is annotated with an event
class (or a union of them) applies that event. Command methods never change state directly:
they :meth:`~Aggregate.record` events, and state changes only in the ``on_`` methods, so
replaying the stored events gives exactly the state the commands produced.

Annotated class attributes are the aggregate's state, with their defaults (copied per
instance, so a ``list`` default is not shared); they are what a snapshot stores, so they must
be msgspec-encodable (builtins, Structs, dataclasses, ...). Class settings:

* ``snapshot_every`` (``ClassVar[int | None]``, default ``None``): store a snapshot whenever a
  save crosses a multiple of this many events.
* ``topic`` (``ClassVar[str | None]``): the bus topic its events are published to (default:
  the class name in lower case).
"""

from __future__ import annotations

import copy
import inspect
import types
from collections.abc import Callable
from typing import Any, ClassVar, Union, get_args, get_origin, get_type_hints

from herald.codec import type_name

__all__ = ["Aggregate"]

_IMMUTABLE = (int, float, str, bool, bytes, type(None), tuple, frozenset)
_RESERVED = frozenset({"id", "version"})


class Aggregate:
    """Base class of event-sourced aggregates; see the module docstring."""

    snapshot_every: ClassVar[int | None] = None
    topic: ClassVar[str | None] = None

    # resolved lazily (annotations may name classes defined after the aggregate)
    __appliers: ClassVar[dict[type, Callable[[Any, Any], None]] | None] = None
    __fields: ClassVar[dict[str, Any] | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.__appliers = None
        cls.__fields = None
        every = cls.__dict__.get("snapshot_every")
        if every is not None and (not isinstance(every, int) or every < 1):
            raise TypeError(f"{cls.__qualname__}.snapshot_every must be an int >= 1 or None")

    def __init__(self, id: str) -> None:
        if not isinstance(id, str) or not id:
            raise ValueError("an aggregate id must be a non-empty string")
        self.id = id
        #: events applied so far, recorded ones included (the stream version once saved)
        self.version = 0
        self._pending: list[Any] = []
        cls = type(self)
        for name in cls.state_fields():
            default = getattr(cls, name, None)
            if not isinstance(default, _IMMUTABLE):
                default = copy.deepcopy(default)
            setattr(self, name, default)

    # --- recording and applying ------------------------------------------------------------

    def record(self, event: Any) -> None:
        """Apply ``event`` now and keep it to be stored by the next save."""
        self.apply(event)
        self._pending.append(event)

    def apply(self, event: Any) -> None:
        """Run the ``on_`` method for ``event`` and count one version (used on replay)."""
        fn = type(self).appliers().get(type(event))
        if fn is None:
            raise TypeError(
                f"{type(self).__qualname__} has no on_ method for {type(event).__qualname__} "
                "(a method named on_... whose event parameter is annotated with that class)"
            )
        fn(self, event)
        self.version += 1

    @property
    def pending_events(self) -> list[Any]:
        """Events recorded since the last save, oldest first."""
        return list(self._pending)

    def _saved(self) -> None:
        self._pending.clear()

    # --- class introspection ---------------------------------------------------------------

    @classmethod
    def appliers(cls) -> dict[type, Callable[[Any, Any], None]]:
        """Event class -> the ``on_`` method applying it. ``TypeError`` for a bad one."""
        found: dict[type, Callable[[Any, Any], None]] | None = cls.__dict__.get(
            "_Aggregate__appliers"
        )
        if found is not None:
            return found
        out: dict[type, Callable[[Any, Any], None]] = {}
        for name, fn in inspect.getmembers(cls, inspect.isfunction):
            if not name.startswith("on_"):
                continue
            params = list(inspect.signature(fn).parameters.values())
            if len(params) != 2:
                raise TypeError(f"{cls.__qualname__}.{name} must take (self, event)")
            try:
                hints = get_type_hints(fn)
            except Exception as e:
                raise TypeError(
                    f"cannot resolve the annotations of {cls.__qualname__}.{name}: {e}"
                ) from e
            ann = hints.get(params[1].name)
            if ann is None:
                raise TypeError(f"{cls.__qualname__}.{name}: annotate the event parameter")
            members = get_args(ann) if get_origin(ann) in (Union, types.UnionType) else (ann,)
            for event_cls in members:
                if not isinstance(event_cls, type):
                    raise TypeError(f"{cls.__qualname__}.{name}: {ann!r} is not an event class")
                other = out.get(event_cls)
                if other is not None and other is not fn:
                    raise TypeError(
                        f"{cls.__qualname__}: two on_ methods apply {event_cls.__qualname__}"
                    )
                out[event_cls] = fn
        cls.__appliers = out
        return out

    @classmethod
    def event_classes(cls) -> list[type]:
        """The event classes this aggregate applies."""
        return list(cls.appliers())

    @classmethod
    def state_fields(cls) -> dict[str, Any]:
        """The annotated state attributes and their types (what a snapshot holds)."""
        found: dict[str, Any] | None = cls.__dict__.get("_Aggregate__fields")
        if found is not None:
            return found
        hints = get_type_hints(cls)
        out = {
            n: t
            for n, t in hints.items()
            if not n.startswith("_")
            and n not in _RESERVED
            and get_origin(t) is not ClassVar
            and t is not ClassVar
        }
        cls.__fields = out
        return out

    @classmethod
    def kind(cls) -> str:
        """The aggregate's name in snapshots (its ``__herald_type__`` or class name)."""
        return type_name(cls)

    def __repr__(self) -> str:
        state = ", ".join(f"{n}={getattr(self, n)!r}" for n in type(self).state_fields())
        return f"{type(self).__name__}(id={self.id!r}, version={self.version}, {state})"
