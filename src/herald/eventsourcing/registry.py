"""The event registry: which class an event type name decodes to, and the upcasters that turn
old stored or received shapes into the current class.

An event class's *schema version* is declared in the core (:func:`herald.codec.schema_version`:
``event_type(name, version=N)`` or a ``__herald_version__`` class attribute, 1 when absent).
When a class changes shape, bump its version and register an upcaster from the old version::

    registry = EventRegistry()

    @registry.upcaster("MoneyDeposited", 1)            # v1 had "amount" in cents as a string
    def cents_to_int(data: dict[str, Any]) -> dict[str, Any]:
        return {**data, "amount": int(data.pop("cents"))}

Upcasters are keyed by ``(type name, version)`` and produce ``version + 1`` (or another type and
version, for a rename); they chain until a registered class at its current version is reached.
Old events are never rewritten: upcasting happens on every read. An event no class and no
upcaster chain can decode raises :class:`~herald.eventsourcing.UnknownEvent` naming its type and
version; it is never skipped.

The same registry decodes bus messages carrying an old ``schema_version`` header (see
:mod:`herald.eventsourcing.upcasting`). It depends only on :mod:`herald.codec`, so the schema
registry can build on it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import msgspec
import pydantic

from herald.codec import schema_version, type_name  # the core owns the version declaration
from herald.eventsourcing.errors import UnknownEvent

__all__ = ["EventRegistry", "Upcaster", "schema_version"]

Upcaster = Callable[[dict[str, Any]], dict[str, Any]]
F = TypeVar("F", bound=Upcaster)
_MSGPACK = "application/msgpack"
_ANY_JSON = msgspec.json.Decoder()
_ANY_MSGPACK = msgspec.msgpack.Decoder()


class _ClassCodec:
    """Decoding of one registered class: bytes (JSON or msgpack) or a plain dict to the class."""

    __slots__ = ("cls", "from_dict", "json", "msgpack", "version")

    def __init__(self, cls: type) -> None:
        self.cls = cls
        self.version = schema_version(cls)
        if issubclass(cls, pydantic.BaseModel):
            model: type[pydantic.BaseModel] = cls
            self.json: Callable[[bytes], Any] = model.model_validate_json
            self.from_dict: Callable[[Any], Any] = model.model_validate
            self.msgpack: Callable[[bytes], Any] = lambda b: model.model_validate(
                _ANY_MSGPACK.decode(b)
            )
        else:
            self.json = msgspec.json.Decoder(cls).decode
            self.msgpack = msgspec.msgpack.Decoder(cls).decode
            self.from_dict = lambda d: msgspec.convert(d, cls)


class EventRegistry:
    """Event classes by type name, and upcasters by ``(type name, schema version)``."""

    def __init__(self, classes: Iterable[type] = ()) -> None:
        self._codecs: dict[str, _ClassCodec] = {}
        self._upcasters: dict[tuple[str, int], tuple[Upcaster, str, int]] = {}
        self.register(*classes)

    def register(self, *classes: type) -> None:
        """Make ``classes`` decodable by their type names. Registering a class twice is fine;
        two classes with one type name are an error."""
        for cls in classes:
            if not isinstance(cls, type):
                raise TypeError(f"register() takes event classes, got {cls!r}")
            name = type_name(cls)
            known = self._codecs.get(name)
            if known is not None:
                if known.cls is not cls:
                    raise TypeError(
                        f"event type {name!r} is already registered for {known.cls.__qualname__}"
                    )
                continue
            self._codecs[name] = _ClassCodec(cls)

    def classes(self) -> dict[str, type]:
        """The registered classes by type name."""
        return {name: c.cls for name, c in self._codecs.items()}

    def upcaster(
        self,
        type: str,
        from_version: int,
        *,
        to_type: str | None = None,
        to_version: int | None = None,
    ) -> Callable[[F], F]:
        """Register the decorated function as the upcaster of ``type`` at ``from_version``.

        It receives the old event as a dict and returns the dict of ``to_type`` (default: the
        same type) at ``to_version`` (default: ``from_version + 1``).
        """
        if not isinstance(from_version, int) or from_version < 1:
            raise ValueError(f"from_version must be an int >= 1, got {from_version!r}")
        target = (to_type or type, from_version + 1 if to_version is None else to_version)
        if target == (type, from_version):
            raise ValueError("an upcaster must change the type or the version")

        def add(fn: F) -> F:
            if not callable(fn):
                raise TypeError(f"upcaster must be a function, got {fn!r}")
            if (type, from_version) in self._upcasters:
                raise ValueError(f"{type!r} version {from_version} already has an upcaster")
            self._upcasters[(type, from_version)] = (fn, *target)
            return fn

        return add

    def sources_of(self, cls: type) -> set[str]:
        """Every type name that decodes to ``cls`` (itself and old names upcast into it)."""
        goal = type_name(cls)
        names = {goal}
        changed = True
        while changed:
            changed = False
            for (src, _v), (_fn, dst, _dv) in self._upcasters.items():
                if dst in names and src not in names:
                    names.add(src)
                    changed = True
        return names

    def decode(
        self, type_name_: str, version: int, payload: bytes, content_type: str | None = None
    ) -> Any:
        """The current event for a stored or received ``(type, version, payload)``.

        Raises :class:`UnknownEvent` (a :class:`~herald.DecodeError`) naming the type and
        version when no class or upcaster chain decodes it, or the payload does not fit.
        """
        codec = self._codecs.get(type_name_)
        msgpack = content_type is not None and content_type.startswith(_MSGPACK)
        try:
            if codec is not None and codec.version == version:  # the common case: no upcasting
                return codec.msgpack(payload) if msgpack else codec.json(payload)
            data = (_ANY_MSGPACK if msgpack else _ANY_JSON).decode(payload)
        except (msgspec.DecodeError, msgspec.ValidationError, pydantic.ValidationError) as e:
            raise UnknownEvent(type_name_, version, f"payload does not fit: {e}") from e
        return self.upcast(type_name_, version, data)

    def upcast(self, type_name_: str, version: int, data: Any) -> Any:
        """Run the upcaster chain from ``(type, version)`` on a decoded dict; build the class."""
        t, v, seen = type_name_, version, 0
        while True:
            codec = self._codecs.get(t)
            if codec is not None and codec.version == v:
                try:
                    return codec.from_dict(data)
                except (msgspec.ValidationError, pydantic.ValidationError) as e:
                    raise UnknownEvent(
                        type_name_, version, f"upcast to {t!r} v{v} does not fit: {e}"
                    ) from e
            step = self._upcasters.get((t, v))
            if step is None:
                if codec is not None:
                    why = f"the class is at version {codec.version} and no upcaster from {v}"
                else:
                    why = "no registered class of that type and no upcaster"
                if (t, v) != (type_name_, version):
                    why += f" (upcast as far as {t!r} v{v})"
                raise UnknownEvent(type_name_, version, why)
            fn, t, v = step
            if not isinstance(data, dict):
                raise UnknownEvent(type_name_, version, "the payload is not an object")
            data = fn(dict(data))
            seen += 1
            if seen > 1000:
                raise UnknownEvent(type_name_, version, "the upcaster chain loops")
