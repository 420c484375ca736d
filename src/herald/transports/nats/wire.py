"""The NATS transport's wire format (see :mod:`herald.transports.nats.transport`).

Pure functions and plain data, no I/O: how a topic or group name becomes a JetStream stream,
subject or consumer name, how a :class:`~herald.message.Message` becomes NATS headers and back.
The format itself is documented in the module docstring of
:mod:`herald.transports.nats.transport`.
"""

from __future__ import annotations

import json
import re

from herald.message import Message

__all__ = [
    "HEADERS",
    "KEY",
    "MSG_ID",
    "TYPE",
    "check_pattern",
    "consumer_name",
    "decode_message",
    "delivery_info",
    "encode_headers",
    "stream_name",
    "subject_covers",
    "subject_for",
]

#: Herald's message id; also JetStream's deduplication id.
MSG_ID = "Nats-Msg-Id"
#: ``Message.key`` (absent: no key).
KEY = "Herald-Key"
#: ``Message.type`` (absent: no type).
TYPE = "Herald-Type"
#: A JSON object of the entries that cannot travel as plain header lines.
HEADERS = "Herald-Headers"

# RFC 7230 token characters: what nats-py (and every NATS client) accepts as a header name.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# Prefixes the server (Nats-*) or this format (Herald-*) gives a meaning to.
_RESERVED = ("nats-", "herald-")
_safe_names: dict[str, bool] = {}


# --- names -------------------------------------------------------------------------------


def stream_name(topic: str) -> str:
    """The JetStream stream of ``topic``: the topic with ``.`` replaced by ``~``.

    Stream names may not contain ``.``; ``~`` is not allowed in Herald names, so the mapping is
    one-to-one (``orders.created`` -> ``orders~created``).
    """
    return topic.replace(".", "~")


def consumer_name(group: str) -> str:
    """The durable consumer of ``group``: the group with ``.`` replaced by ``~``."""
    return group.replace(".", "~")


def subject_for(topic: str) -> str:
    """The subject messages of ``topic`` are published on.

    The topic itself when it is a valid NATS subject (no empty ``.``-separated token); a name
    like ``a..b`` or ``a.`` uses its stream name instead (one token; ``~`` cannot occur in a
    topic, so it collides with no other topic's subject).
    """
    if topic.endswith(".") or ".." in topic:
        return stream_name(topic)
    return topic


def check_pattern(pattern: str) -> str:
    """Check a NATS subject pattern (``bind=``): ``.``-separated non-empty tokens without
    whitespace; ``*`` only as a whole token, ``>`` only as the whole last one."""
    tokens = pattern.split(".")
    for i, tok in enumerate(tokens):
        bad = (
            not tok
            or any(c.isspace() for c in tok)
            or ("*" in tok and tok != "*")
            or (">" in tok and (tok != ">" or i != len(tokens) - 1))
        )
        if bad:
            raise ValueError(
                f"bind pattern {pattern!r} is not a NATS subject: use '.'-separated tokens, "
                "'*' for one whole token, '>' as the last token for the rest"
            )
    return pattern


def subject_covers(pattern: str, other: str) -> bool:
    """Whether every subject that ``other`` (a subject or pattern) matches is matched by
    ``pattern`` too; with a plain subject as ``other``: whether ``pattern`` matches it."""
    a, b = pattern.split("."), other.split(".")
    for i, tok in enumerate(a):
        if tok == ">":
            return len(b) > i
        if i >= len(b) or b[i] == ">":
            return False
        if tok != "*" and tok != b[i]:
            return False
    return len(a) == len(b)


# --- messages ------------------------------------------------------------------------------


def _safe_name(name: str) -> bool:
    ok = _safe_names.get(name)
    if ok is None:
        ok = bool(_TOKEN.fullmatch(name)) and not name.lower().startswith(_RESERVED)
        if len(_safe_names) < 4096:
            _safe_names[name] = ok
    return ok


def _safe_value(value: str) -> bool:
    # Header lines end at CR/LF and clients trim the value, so control characters and edge
    # whitespace would not survive; everything else (UTF-8 included) travels as is.
    return value.isprintable() and (not value or (value[0] != " " and value[-1] != " "))


def encode_headers(message: Message) -> dict[str, str]:
    """The NATS headers carrying ``message`` (all but its payload and topic)."""
    out: dict[str, str] = {}
    packed: dict[str, str] | None = None
    fixed = [(MSG_ID, message.id)]
    if message.key is not None:
        fixed.append((KEY, message.key))
    if message.type is not None:
        fixed.append((TYPE, message.type))
    for name, value in fixed:
        if _safe_value(value):
            out[name] = value
        else:
            packed = packed or {}
            packed[name] = value
    for name, value in message.headers.items():
        if _safe_name(name) and _safe_value(value):
            out[name] = value
        else:
            packed = packed or {}
            packed[name] = value
    if packed is not None:
        out[HEADERS] = json.dumps(packed, ensure_ascii=True, separators=(",", ":"))
    return out


def delivery_info(reply: str) -> tuple[int, int]:
    """``(delivery count, stream sequence)`` from a JetStream ack subject.

    ``$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>`` or the newer form
    with domain and account hash after ``ACK`` (12 tokens).
    """
    tokens = reply.split(".")
    if len(tokens) == 9:
        return int(tokens[4]), int(tokens[5])
    if len(tokens) >= 11:
        return int(tokens[6]), int(tokens[7])
    raise ValueError(f"not a JetStream ack subject: {reply!r}")


def decode_message(
    topic: str,
    data: bytes,
    headers: dict[str, str] | None,
    stream_seq: int,
    *,
    stream: str | None = None,
    subject: str | None = None,
) -> Message:
    """Rebuild the envelope of a delivered message; ``headers`` is consumed.

    A message without ``Nats-Msg-Id`` (a plain client's) gets the id ``nats:<topic>:<seq>``
    (``nats:<stream>:<seq>`` when read from a ``stream`` that is not the topic's own), stable
    across redeliveries. One without ``Herald-Key`` gets ``subject`` as its key: the caller
    passes the subject it arrived on when that is not the topic's own (a ``bind`` pattern's).
    """
    fallback = f"nats:{stream or topic}:{stream_seq}"
    if not headers:
        return Message(id=fallback, topic=topic, payload=data, key=subject)
    packed = headers.pop(HEADERS, None)
    if packed is not None:
        try:
            extra = json.loads(packed)
            if not isinstance(extra, dict):
                raise ValueError("not an object")
            headers.update({str(k): str(v) for k, v in extra.items()})
        except ValueError:
            # Written by hand: deliver it anyway rather than wedge the group on it.
            headers[HEADERS] = packed
    return Message(
        id=headers.pop(MSG_ID, "") or fallback,
        topic=topic,
        payload=data,
        key=headers.pop(KEY, subject),
        type=headers.pop(TYPE, None),
        headers=headers,
    )
