"""The MQTT transport's wire format (see :mod:`herald.transports.mqtt.transport`).

How a :class:`~herald.message.Message` becomes MQTT 5 PUBLISH properties and back. The format
itself is documented in the module docstring of :mod:`herald.transports.mqtt.transport`. No I/O.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from herald.message import CONTENT_TYPE, Message, new_id

__all__ = [
    "ATTEMPT_PROP",
    "ID_PROP",
    "KEY_PROP",
    "NOT_BEFORE_PROP",
    "PACKED_PROP",
    "TYPE_PROP",
    "Incoming",
    "decode_message",
    "encode_properties",
    "now_ms",
]

# Envelope fields travel as MQTT 5 user properties with these names (documented wire format).
ID_PROP = "x-herald-id"
KEY_PROP = "x-herald-key"
TYPE_PROP = "x-herald-type"
ATTEMPT_PROP = "x-herald-attempt"
NOT_BEFORE_PROP = "x-herald-not-before"
_RESERVED = "x-herald-"
#: A header whose own name starts with ``x-herald-`` is written with this prefix, so it can
#: never be mistaken for an envelope field; the reader strips it again.
_ESCAPED = "x-herald-h-"
#: Entries whose name or value an MQTT 5 string may not carry (brokers such as Mosquitto drop
#: the connection on control characters, e.g. the newlines of a dead letter's traceback) all
#: travel in this one property, as a JSON object with every non-ASCII character escaped.
PACKED_PROP = "x-herald-packed"
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff\ufdd0-\ufdef\ufffe\uffff]")


def encode_properties(
    message: Message, *, attempt: int = 1, not_before_ms: int | None = None
) -> Properties:
    """MQTT 5 PUBLISH properties carrying the envelope (see the module docs of ``mqtt``)."""
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    entries: list[tuple[str, str]] = [(ID_PROP, message.id)]
    if message.key is not None:
        entries.append((KEY_PROP, message.key))
    if message.type is not None:
        entries.append((TYPE_PROP, message.type))
    if attempt != 1:
        entries.append((ATTEMPT_PROP, str(attempt)))
    if not_before_ms is not None:
        entries.append((NOT_BEFORE_PROP, str(not_before_ms)))
    for name, value in message.headers.items():
        if name == CONTENT_TYPE and not _UNSAFE.search(value):
            props.ContentType = value
            continue
        entries.append((_ESCAPED + name if name.startswith(_RESERVED) else name, value))
    user: list[tuple[str, str]] = []
    packed: dict[str, str] = {}
    for name, value in entries:
        if _UNSAFE.search(name) or _UNSAFE.search(value):
            packed[name] = value
        else:
            user.append((name, value))
    if packed:
        user.append((PACKED_PROP, json.dumps(packed, ensure_ascii=True)))
    props.UserProperty = user
    return props


@dataclass(slots=True)
class Incoming:
    """A received PUBLISH decoded into the envelope, plus the transport's own fields."""

    message: Message
    attempt: int
    not_before: float  # Unix seconds; 0 when due at once


def decode_message(
    topic: str, payload: bytes, props: Properties | None, *, subject: str | None = None
) -> Incoming:
    """Turn a received PUBLISH into a :class:`Message`. A plain client's message (no
    ``x-herald-id``) gets a fresh id here; ``content_type`` comes from the MQTT 5 Content Type;
    without ``x-herald-key`` the key is ``subject`` (the MQTT topic of a message that came
    through a ``bind`` filter, else None)."""
    id_: str | None = None
    key: str | None = subject
    type_: str | None = None
    attempt = 1
    not_before = 0.0
    headers: dict[str, str] = {}
    if props is not None:
        content_type = getattr(props, "ContentType", None)
        if content_type is not None:
            headers[CONTENT_TYPE] = content_type
        pairs = list(getattr(props, "UserProperty", None) or ())
        for name, value in list(pairs):
            if name == PACKED_PROP:
                pairs.remove((name, value))
                try:
                    unpacked = json.loads(value)
                except ValueError:
                    unpacked = None
                if isinstance(unpacked, dict):
                    pairs += [(str(k), str(v)) for k, v in unpacked.items()]
                else:  # written by hand: keep it as it came rather than wedge the group
                    pairs.append((_ESCAPED + name, value))
        for name, value in pairs:
            if name == CONTENT_TYPE:
                headers[CONTENT_TYPE] = value
            elif not name.startswith(_RESERVED):
                headers[name] = value
            elif name.startswith(_ESCAPED):
                headers[name[len(_ESCAPED) :]] = value
            elif name == ID_PROP:
                id_ = value
            elif name == KEY_PROP:
                key = value
            elif name == TYPE_PROP:
                type_ = value
            elif name == ATTEMPT_PROP:
                attempt = int(value) if value.isdigit() and int(value) > 0 else 1
            elif name == NOT_BEFORE_PROP and value.isdigit():
                not_before = int(value) / 1000
            else:
                headers[name] = value  # unknown x-herald-* from a newer Herald: keep it
    message = Message(
        id=id_ or new_id(), topic=topic, payload=payload, key=key, type=type_, headers=headers
    )
    return Incoming(message, attempt, not_before)


def now_ms() -> int:
    return time.time_ns() // 1_000_000
