"""The Kafka wire format of a Herald envelope: record key, value and headers.

=================  ==========================================================================
envelope           Kafka record
=================  ==========================================================================
``key``            record key, UTF-8 (``None`` -> no key: the producer spreads such records)
``payload``        record value, bytes unchanged (an empty payload is an empty value)
``id``             header ``herald.id`` (UTF-8)
``type``           header ``herald.type`` (absent when ``None``)
``headers``        one Kafka header per entry, name and value UTF-8
``attempt``        header ``herald.attempt`` on retry copies only (first deliveries carry none)
(retry copies)     header ``herald.due_at``: when the copy is due, Unix epoch milliseconds
=================  ==========================================================================

Header names starting with ``herald.`` are reserved. A record from a plain client (no
``herald.id``) gets the stable id ``<topic>:<partition>:<offset>``, so a redelivery of it has
the same id (and the idempotent inbox recognises it); header values that are not UTF-8 are
decoded with replacement characters.
"""

from __future__ import annotations

from collections.abc import Sequence

from herald.message import Message

__all__ = [
    "ATTEMPT_HEADER",
    "DUE_AT_HEADER",
    "ID_HEADER",
    "RESERVED_PREFIX",
    "TYPE_HEADER",
    "decode_record",
    "due_at_ms",
    "encode_headers",
    "record_size",
    "retry_topic",
]

RESERVED_PREFIX = "herald."
ID_HEADER = "herald.id"
TYPE_HEADER = "herald.type"
ATTEMPT_HEADER = "herald.attempt"
DUE_AT_HEADER = "herald.due_at"

Headers = list[tuple[str, bytes]]


def retry_topic(topic: str, group: str) -> str:
    """The retry topic of ``group`` on ``topic``: where its ``nack(delay)`` copies go."""
    return f"{topic}.{group}.retry"


def due_at_ms(headers: Sequence[tuple[str, bytes]]) -> float:
    """When a retry copy with these record headers is due (``herald.due_at``, Unix epoch
    milliseconds); 0.0 (due now) when the header is absent or not a number."""
    for name, value in headers:
        if name == DUE_AT_HEADER:
            try:
                return float(value)
            except (TypeError, ValueError):
                return 0.0
    return 0.0


def encode_headers(message: Message, extra: Sequence[tuple[str, bytes]] = ()) -> Headers:
    """The Kafka headers of ``message``: its id and type, its headers, then ``extra``."""
    out: Headers = [(ID_HEADER, message.id.encode())]
    if message.type is not None:
        out.append((TYPE_HEADER, message.type.encode()))
    for name, value in message.headers.items():
        out.append((name, value.encode()))
    out.extend(extra)
    return out


def record_size(message: Message) -> int:
    """An upper estimate of the encoded record's size in bytes (for the max size check)."""
    size = 64 + len(message.payload) + len(message.id) + len(message.type or "") * 4
    if message.key is not None:
        size += len(message.key) * 4
    for name, value in message.headers.items():
        size += 8 + (len(name) + len(value)) * 4
    return size


def decode_record(
    topic: str,
    partition: int,
    offset: int,
    key: bytes | None,
    value: bytes | None,
    headers: Sequence[tuple[str, bytes | None]],
) -> tuple[Message, dict[str, str]]:
    """Build the envelope of a record; also return its reserved ``herald.*`` headers."""
    try:  # the common case: every value UTF-8; one comprehension is much cheaper than a loop
        user: dict[str, str] = {name: raw.decode() for name, raw in headers}  # type: ignore[union-attr]
    except (UnicodeDecodeError, AttributeError):  # invalid UTF-8, or a null header value
        user = {
            name: raw.decode("utf-8", "replace") if raw is not None else "" for name, raw in headers
        }
    reserved: dict[str, str] = {}
    for name in [n for n in user if n.startswith(RESERVED_PREFIX)]:
        reserved[name] = user.pop(name)
    mid = reserved.pop(ID_HEADER, None)
    message = Message(
        id=mid or f"{topic}:{partition}:{offset}",
        topic=topic,
        key=key.decode("utf-8", "replace") if key is not None else None,
        type=reserved.pop(TYPE_HEADER, None),
        payload=value if value is not None else b"",
        headers=user,
    )
    return message, reserved
