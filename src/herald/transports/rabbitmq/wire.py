"""RabbitMQ helpers for :mod:`herald.transports.rabbitmq.transport`: object names, wire format.

Kept apart from the transport so the I/O-free parts (what an envelope looks like as an AMQP
message, what the broker objects are called) read and test on their own. The wire format itself
is documented in the transport's module docstring.
"""

from __future__ import annotations

import hashlib
import math
from datetime import datetime
from decimal import Decimal
from typing import Any

from pamqp.commands import Basic

from herald.message import CONTENT_TYPE, Message, new_id

__all__ = [
    "ATTEMPT_HEADER",
    "KEY_HEADER",
    "MAX_NAME",
    "check_pattern",
    "check_source_queue",
    "decode",
    "delay_bucket",
    "delay_queue",
    "encode",
    "exchange_name",
    "fit",
    "group_queue",
    "parked_name",
]

#: Header the transport sets when it republishes a message itself (delayed redelivery):
#: the attempt the next delivery is on. Absent means 1.
ATTEMPT_HEADER = "x-herald-attempt"
#: Header carrying the message key when the routing key cannot (republished copies, which are
#: routed by queue name; a key of "" or longer than 255 bytes).
KEY_HEADER = "x-herald-key"
#: Headers the broker or this transport add; never part of the envelope's headers.
_RESERVED = frozenset(
    {
        ATTEMPT_HEADER,
        KEY_HEADER,
        "x-delivery-count",
        "x-death",
        "x-first-death-exchange",
        "x-first-death-queue",
        "x-first-death-reason",
        "x-last-death-exchange",
        "x-last-death-queue",
        "x-last-death-reason",
    }
)
#: AMQP short strings (routing keys) hold at most 255 bytes.
MAX_NAME = 255
#: Exchange and queue names: AMQP 0-9-1 allows 127 characters (RabbitMQ more; the client
#: library enforces the spec).
MAX_OBJECT = 127
#: RabbitMQ's default ``max_message_size`` (128 MiB); larger bodies are refused by the broker.
MAX_PAYLOAD = 128 * 1024 * 1024
# --- object names -------------------------------------------------------------------------
# ':' never occurs in topic or group names, so names built with it cannot collide with a topic
# exchange or with another topic's objects (with '.', topic "a.b" group "c" and topic "a"
# group "b.c" would share a queue).


def fit(name: str) -> str:
    """Return ``name`` if it fits an AMQP short string, else a stable shortened form."""
    if len(name.encode()) <= MAX_OBJECT:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:32]
    return f"{name[:90]}:{digest}"


def exchange_name(topic: str) -> str:
    """The topic exchange of ``topic``: the topic's name (shortened past 127 characters)."""
    return fit(topic)


def group_queue(topic: str, group: str) -> str:
    """The durable queue of ``group`` on ``topic``: ``<topic>:<group>``."""
    return fit(f"{topic}:{group}")


def parked_name(topic: str) -> str:
    """The alternate exchange and queue holding messages no group was bound for."""
    return fit(f"{topic}:parked")


def delay_bucket(delay: float) -> int:
    """The delay queue bucket (milliseconds, a power of two >= 16) for ``delay`` seconds."""
    ms = max(1, math.ceil(delay * 1000))
    return max(16, 1 << (ms - 1).bit_length())


def delay_queue(base: str, bucket_ms: int) -> str:
    """The TTL queue holding delayed redeliveries of up to ``bucket_ms`` for one queue:
    ``<base>:delay:<bucket>``, where ``base`` is ``<topic>:<group>`` for a group's own queue
    (see :func:`group_queue`) and the queue's name for a ``source=`` queue."""
    return fit(f"{base}:delay:{bucket_ms}")


def check_source_queue(name: str) -> str:
    """Check a ``source=`` queue name: at most :data:`MAX_OBJECT` bytes (the AMQP client's
    limit)."""
    if len(name.encode()) > MAX_OBJECT:
        raise ValueError(f"source queue name longer than {MAX_OBJECT} bytes: {name[:40]!r}...")
    return name


def check_pattern(pattern: str) -> str:
    """Check an AMQP topic binding pattern (``bind=``): at most 255 bytes."""
    if len(pattern.encode()) > MAX_NAME:
        raise ValueError(f"bind pattern longer than {MAX_NAME} bytes: {pattern[:40]!r}...")
    return pattern


# --- wire format --------------------------------------------------------------------------


def encode(
    message: Message, *, attempt: int = 1, key_header: bool = False
) -> tuple[str, Basic.Properties]:
    """Return the routing key and AMQP properties for ``message``.

    ``key_header`` also writes the key into :data:`KEY_HEADER` (republished copies are routed
    by queue name, so the routing key cannot carry it there).
    """
    key = message.key
    headers: dict[str, Any] = dict(message.headers) if message.headers else {}
    if key is None:
        routing_key = ""
    else:
        routing_key = key
        if key_header or key == "" or len(key.encode()) > MAX_NAME:
            headers[KEY_HEADER] = key
            routing_key = key.encode()[:MAX_NAME].decode(errors="ignore")
    if attempt != 1:
        headers[ATTEMPT_HEADER] = str(attempt)
    props = Basic.Properties(
        delivery_mode=2,
        message_id=message.id,
        message_type=message.type,
        content_type=message.headers.get(CONTENT_TYPE) if message.headers else None,
        headers=headers or None,
    )
    return routing_key, props


def _text(value: Any) -> str:
    """A header value from a plain client as the envelope's str."""
    if isinstance(value, str):
        return value
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode(errors="replace")
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float | Decimal):
        return str(value)
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


def decode(
    topic: str,
    routing_key: str,
    props: Basic.Properties,
    body: bytes,
    redelivered: bool,
) -> tuple[Message, int]:
    """Return the envelope and the attempt number of one delivered AMQP message."""
    raw = props.headers or {}
    headers: dict[str, str] = {}
    attempt = 1
    delivery_count = -1
    key: str | None = routing_key if routing_key else None
    for name, value in raw.items():
        if name not in _RESERVED:
            headers[name] = _text(value)
        elif name == KEY_HEADER:
            key = _text(value)
        elif name == ATTEMPT_HEADER:
            try:
                attempt = max(1, int(_text(value)))
            except ValueError:
                attempt = 1
        elif name == "x-delivery-count":  # quorum queues: returns since it was enqueued
            try:
                delivery_count = int(_text(value))
            except ValueError:
                delivery_count = -1
    if delivery_count >= 0:
        attempt += delivery_count
    elif redelivered:  # a classic queue says only "seen before"
        attempt += 1
    if props.content_type and CONTENT_TYPE not in headers:
        headers[CONTENT_TYPE] = props.content_type
    message = Message(
        id=props.message_id or new_id(),
        topic=topic,
        payload=body,
        key=key,
        type=props.message_type or None,
        headers=headers,
    )
    return message, attempt
