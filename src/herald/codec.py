"""Typed payloads <-> bytes.

Publishing: :func:`encode` turns an object into payload bytes, an event ``type`` name and a
content type. Pydantic models, msgspec Structs, dataclasses, dicts, lists and scalars become
JSON (or MessagePack); ``bytes`` pass through untouched; ``str`` is UTF-8 text.

Consuming: :func:`decoder_for` looks at a handler's parameter annotation once, at registration,
and returns a :class:`Decoder` that turns a :class:`~herald.message.Message` into that type.
An annotation Herald cannot decode is an error at registration, not at runtime. A payload that
fails to decode raises :class:`DecodeError`, which the failure path treats as permanent (no
retry can fix it).

Event type names: a class's name unless it sets ``__herald_type__`` (see :func:`event_type`).
A handler for ``OrderPlaced`` accepts messages whose ``type`` header is ``"OrderPlaced"``, or
that carry no type at all (a plain client's message). A union of event classes dispatches on
the ``type`` header.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import msgspec
import msgspec.inspect
import pydantic
from pydantic_core import PydanticSerializationError

from herald.errors import DecodeError
from herald.message import Message

__all__ = [
    "CONTENT_TYPES",
    "DecodeError",
    "Decoder",
    "Format",
    "declared_version",
    "decoder_for",
    "encode",
    "encode_many",
    "event_type",
    "schema_version",
    "type_name",
]

Format = Literal["json", "msgpack"]

JSON = "application/json"
MSGPACK = "application/msgpack"
OCTET = "application/octet-stream"
TEXT = "text/plain; charset=utf-8"
CONTENT_TYPES: dict[Format, str] = {"json": JSON, "msgpack": MSGPACK}

T = TypeVar("T", bound=type)


def event_type(name: str, *, version: int | None = None) -> Callable[[T], T]:
    """Class decorator giving an event a stable wire name, independent of the Python class name,
    and optionally its schema version (stored as ``__herald_version__``; see
    :func:`schema_version`).

    >>> @event_type("shop.OrderPlaced", version=2)
    ... class OrderPlaced(pydantic.BaseModel): ...
    """
    if not name or not isinstance(name, str):
        raise ValueError("event type name must be a non-empty string")
    if version is not None:
        _check_version(name, version)

    def apply(cls: T) -> T:
        cls.__herald_type__ = name  # type: ignore[attr-defined]
        if version is not None:
            cls.__herald_version__ = version  # type: ignore[attr-defined]
        return cls

    return apply


def type_name(cls: type) -> str:
    """The wire name of an event class."""
    name = cls.__dict__.get("__herald_type__")
    return name if isinstance(name, str) else cls.__name__


def declared_version(cls: type) -> int | None:
    """The schema version an event class declares (``event_type(..., version=N)`` or a
    ``__herald_version__`` class attribute), or None if it declares none. Publishing sets the
    ``schema_version`` header from it; a bad declaration raises ``TypeError``."""
    v = getattr(cls, "__herald_version__", None)
    if v is None:
        return None
    _check_version(cls.__qualname__, v)
    return int(v)


def schema_version(cls: type) -> int:
    """The schema version of an event class: its declared version, default 1."""
    v = declared_version(cls)
    return 1 if v is None else v


def _check_version(what: str, v: object) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise TypeError(
            f"{what}: the schema version (__herald_version__) must be an int >= 1, got {v!r}"
        )


# --- encoding --------------------------------------------------------------------------------

_json_encoder = msgspec.json.Encoder()
_msgpack_encoder = msgspec.msgpack.Encoder()
_type_names: dict[type, str | None] = {}  # class -> wire name (None for plain containers)
_PLAIN = (dict, list, tuple, int, float, bool, type(None))
_SPECIAL = (bytes, bytearray, memoryview, str)  # not encoded by msgspec
# what the decoding libraries raise for bytes that do not fit the type
_INVALID = (msgspec.DecodeError, msgspec.ValidationError, pydantic.ValidationError)


def _name_of(cls: type) -> str | None:
    try:
        return _type_names[cls]
    except KeyError:
        name = _type_names[cls] = None if cls in _PLAIN else type_name(cls)
        return name


def encode_many(
    objs: Sequence[object], fmt: Format = "json"
) -> list[tuple[bytes, str | None, str]]:
    """:func:`encode` for a batch; much cheaper per object when they share a class."""
    out = []
    json_plain = fmt == "json"
    enc = _json_encoder.encode if json_plain else _msgpack_encoder.encode
    last: type | None = None
    name: str | None = None
    for obj in objs:
        cls = type(obj)
        if cls is not last:
            last = cls
            special = cls in _SPECIAL or issubclass(cls, pydantic.BaseModel)
            name = _name_of(cls)
        if special:
            out.append(encode(obj, fmt))
            continue
        try:
            payload = enc(obj)
        except (TypeError, ValueError, msgspec.EncodeError) as e:
            raise _encode_error(obj, fmt, e) from e
        out.append((payload, name, CONTENT_TYPES[fmt]))
    return out


def _encode_error(obj: object, fmt: str, e: Exception) -> TypeError:
    cls = type(obj)
    return TypeError(
        f"cannot serialise {cls.__module__}.{cls.__qualname__} as {fmt}: {e}. Publish a "
        "Pydantic model, msgspec Struct, dataclass, dict/list of JSON values, str or bytes."
    )


def encode(obj: object, fmt: Format = "json") -> tuple[bytes, str | None, str]:
    """Return ``(payload, type_name, content_type)`` for ``obj``.

    Raises ``TypeError`` naming the object's type when it cannot be serialised.
    """
    cls = type(obj)
    if cls is bytes or cls is bytearray or cls is memoryview:
        return bytes(obj), None, OCTET  # type: ignore[call-overload]
    if cls is str:
        return obj.encode(), None, TEXT  # type: ignore[attr-defined]
    try:
        if isinstance(obj, pydantic.BaseModel):
            if fmt == "json":
                payload = obj.__pydantic_serializer__.to_json(obj)
            else:
                payload = _msgpack_encoder.encode(obj.model_dump(mode="json"))
        elif fmt == "json":
            payload = _json_encoder.encode(obj)
        else:
            payload = _msgpack_encoder.encode(obj)
    except (TypeError, ValueError, msgspec.EncodeError, PydanticSerializationError) as e:
        raise _encode_error(obj, fmt, e) from e
    return payload, _name_of(cls), CONTENT_TYPES[fmt]


# --- decoding --------------------------------------------------------------------------------


class Decoder:
    """Turns messages into one annotated type.

    ``accepts`` is the set of ``type`` header values this decoder takes, or ``None`` for any
    (``bytes``, ``str``, ``dict``, ``Message``, unannotated). Messages without a ``type`` header
    are always accepted.
    """

    __slots__ = ("accepts", "annotation", "raw")

    def __init__(
        self, annotation: Any, accepts: frozenset[str] | None, fn: Callable[[Message], Any]
    ) -> None:
        self.annotation = annotation
        self.accepts = accepts
        #: the bare decode function: may raise any exception; :meth:`explain` turns it into a
        #: DecodeError. The consumer calls this directly to save a frame per message.
        self.raw = fn

    def accepts_type(self, type_: str | None) -> bool:
        return type_ is None or self.accepts is None or type_ in self.accepts

    def __call__(self, message: Message) -> Any:
        """Decode ``message``; raise :class:`DecodeError` with the reason when it does not fit."""
        try:
            return self.raw(message)
        except Exception as e:
            raise self.explain(e) from e

    def explain(self, error: Exception) -> DecodeError:
        """The :class:`DecodeError` for an exception raised by :attr:`raw`."""
        if isinstance(error, DecodeError):
            return error
        what = _describe(self.annotation)
        if isinstance(error, _INVALID):
            return DecodeError(f"payload does not match {what}: {error}")
        return DecodeError(f"payload cannot be decoded as {what}: {type(error).__name__}: {error}")


def _describe(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or repr(annotation)


def _is_msgpack(message: Message) -> bool:
    ct = message.headers.get("content_type")
    return ct is not None and ct.startswith(MSGPACK)


def _single(cls: Any) -> Callable[[Message], Any]:
    """A decode function for one non-union annotation. Raises TypeError if unsupported."""
    if cls is bytes:
        return lambda m: m.payload
    if cls is Message:
        return lambda m: m
    if cls is str:
        return lambda m: m.payload.decode("utf-8")
    if isinstance(cls, type) and issubclass(cls, pydantic.BaseModel):
        model: type[pydantic.BaseModel] = cls
        mp = msgspec.msgpack.Decoder()

        def decode_model(m: Message) -> Any:
            if _is_msgpack(m):
                return model.model_validate(mp.decode(m.payload))
            return model.model_validate_json(m.payload)

        return decode_model
    # msgspec covers Structs, dataclasses, TypedDicts, attrs, containers and scalars. It
    # would accept any other class as a "custom type" and fail on every message; refuse now.
    _reject_custom_types(msgspec.inspect.type_info(cls), set())
    jd = msgspec.json.Decoder(cls)
    md = msgspec.msgpack.Decoder(cls)
    jdecode, mdecode = jd.decode, md.decode

    def decode_plain(m: Message) -> Any:
        ct = m.headers.get("content_type")  # inlined _is_msgpack: this is the hot path
        if ct is not None and ct.startswith(MSGPACK):
            return mdecode(m.payload)
        return jdecode(m.payload)

    return decode_plain


def _reject_custom_types(node: Any, seen: set[int]) -> None:
    if id(node) in seen:
        return
    seen.add(id(node))
    if isinstance(node, msgspec.inspect.CustomType):
        raise TypeError(f"{node.cls!r} is not a type Herald can decode")
    for value in getattr(node, "__struct_fields__", ()):
        child = getattr(node, value)
        children = child if isinstance(child, tuple | list) else (child,)
        for c in children:
            if isinstance(c, msgspec.inspect.Field):
                c = c.type
            if isinstance(c, msgspec.inspect.Type):
                _reject_custom_types(c, seen)


def _is_event_class(cls: Any) -> bool:
    return isinstance(cls, type) and (
        issubclass(cls, pydantic.BaseModel | msgspec.Struct)
        or dataclasses.is_dataclass(cls)
        or typing.is_typeddict(cls)
    )


def decoder_for(annotation: Any) -> Decoder:
    """Build the decoder for a handler parameter annotation.

    Raises ``TypeError`` with a clear message when Herald cannot decode the annotation.
    """
    if annotation is Any or annotation is None or annotation is object:
        return Decoder(Any, None, _single(Any))
    origin = get_origin(annotation)
    if origin is Union or origin is types.UnionType:
        members = [a for a in get_args(annotation) if a is not type(None)]
        events = [a for a in members if _is_event_class(a)]
        if events and len(events) == len(members):
            by_type = {type_name(c): _single(c) for c in events}
            if len(by_type) != len(events):
                raise TypeError(f"union {annotation!r} has two event classes with one type name")
            ordered = list(by_type.values())

            def first_fit(m: Message) -> Any:
                # no type header (a plain client's message): the first member that validates
                errors = []
                for fn in ordered:
                    try:
                        return fn(m)
                    except (
                        msgspec.DecodeError,
                        msgspec.ValidationError,
                        pydantic.ValidationError,
                    ) as e:
                        errors.append(str(e))
                raise DecodeError(
                    f"message has no type header and fits no member of {annotation!r}: {errors}"
                )

            def dispatch(m: Message) -> Any:
                fn = by_type.get(m.type) if m.type is not None else None
                return (fn or first_fit)(m)

            return Decoder(annotation, frozenset(by_type), dispatch)
    try:
        fn = _single(annotation)
    except TypeError as e:
        raise TypeError(
            f"Herald cannot decode events annotated as {annotation!r}: {e}. Use a Pydantic "
            "model, msgspec Struct, dataclass, TypedDict, dict, str, bytes, Message, or a "
            "union of event classes."
        ) from e
    # Message is a Struct but means "the raw envelope": it takes every type
    is_event = _is_event_class(annotation) and annotation is not Message
    accepts = frozenset({type_name(annotation)}) if is_event else None
    return Decoder(annotation, accepts, fn)
