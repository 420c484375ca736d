"""The Redis transport's wire format (see :mod:`herald.transports.redis.transport`).

How a :class:`~herald.message.Message` becomes the fields of a stream entry and back, the names
of a topic's helper keys, and the small helpers around redis-py's untyped commands and replies.
The format itself is documented in the module docstring of :mod:`herald.transports.redis.transport`.
"""

from __future__ import annotations

from typing import Any

import msgspec
from redis.exceptions import ResponseError

from herald.message import Message

__all__ = [
    "ATTEMPT_FIELD",
    "as_str",
    "delayed_key",
    "entry_fields",
    "entry_message",
    "execute",
    "groups_key",
    "is_nogroup",
    "raw_reply",
    "retry_key",
]

#: Field of a retry-stream entry: the attempt its first delivery from there is.
ATTEMPT_FIELD = b"herald:attempt"

_encode_headers = msgspec.json.Encoder().encode
_decode_headers = msgspec.json.Decoder(dict[str, str]).decode


def entry_fields(message: Message) -> list[str | bytes]:
    """The stream fields of ``message`` (see the module docs)."""
    f: list[str | bytes] = ["id", message.id, "payload", message.payload]
    if message.key is not None:
        f += ("key", message.key)
    if message.type is not None:
        f += ("type", message.type)
    if message.headers:
        f += ("headers", _encode_headers(message.headers))
    return f


def entry_message(topic: str, eid: bytes, flat: list[bytes]) -> tuple[Message, int]:
    """Build the message of one stream entry; also return its ``herald:attempt`` (0: none)."""
    fields = dict(zip(flat[::2], flat[1::2], strict=False))
    payload = fields.pop(b"payload", None)
    mid = fields.pop(b"id", None)
    key = fields.pop(b"key", None)
    type_ = fields.pop(b"type", None)
    raw_headers = fields.pop(b"headers", None)
    attempt = fields.pop(ATTEMPT_FIELD, None)
    headers = _headers(raw_headers) if raw_headers else {}
    if fields:
        if payload is None:  # a plain client's entry: its fields are the payload
            payload = _encode_headers({_text(k): _text(v) for k, v in fields.items()})
        else:
            for k, v in fields.items():
                headers.setdefault(_text(k), _text(v))
    message = Message(
        id=mid.decode() if mid is not None else eid.decode(),
        topic=topic,
        payload=payload if payload is not None else b"{}",
        key=_text(key) if key is not None else None,
        type=_text(type_) if type_ is not None else None,
        headers=headers,
    )
    try:
        base = int(attempt) if attempt is not None else 0
    except ValueError:
        base = 0
    return message, base


def _headers(raw: bytes) -> dict[str, str]:
    try:
        return _decode_headers(raw)
    except msgspec.DecodeError:
        # Written by another client: deliver it anyway rather than wedge the group on it.
        return {"invalid_headers": _text(raw)}


def _text(b: bytes) -> str:
    return b.decode("utf-8", "replace")


def groups_key(topic: str) -> str:
    return f"herald:{{{topic}}}:groups"


def retry_key(topic: str, group: str) -> str:
    return f"herald:{{{topic}}}:retry:{group}"


def delayed_key(topic: str, group: str) -> str:
    return f"herald:{{{topic}}}:delayed:{group}"


def is_nogroup(e: ResponseError) -> bool:
    """The group or its stream is gone ("UNBLOCKED the stream key no longer exists": deleted
    while a blocking read waited on it)."""
    head = str(e)[:60]
    return "NOGROUP" in head or head.startswith("UNBLOCKED")


def raw_reply(response: Any, **options: Any) -> Any:
    return response


async def execute(client: Any, *args: Any) -> Any:
    """``client.execute_command(*args)`` (untyped in redis-py)."""
    return await client.execute_command(*args)


def as_str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
