"""The NATS transport's wire format and URL options (see :mod:`herald.transports.nats.transport`).

Pure functions and plain data, no I/O: how a topic or group name becomes a JetStream stream,
subject or consumer name, how a :class:`~herald.message.Message` becomes NATS headers and back,
and how a ``nats://`` URL is parsed into :class:`NatsOptions`. The format itself is documented
in the module docstring of :mod:`herald.transports.nats.transport`.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from urllib.parse import parse_qsl, unquote, urlsplit

from herald.message import Message

__all__ = [
    "HEADERS",
    "KEY",
    "MSG_ID",
    "TYPE",
    "NatsOptions",
    "consumer_name",
    "decode_message",
    "delivery_info",
    "encode_headers",
    "parse_url",
    "stream_name",
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
    topic: str, data: bytes, headers: dict[str, str] | None, stream_seq: int
) -> Message:
    """Rebuild the envelope of a delivered message; ``headers`` is consumed.

    A message without ``Nats-Msg-Id`` (a plain client's) gets the id ``nats:<topic>:<seq>``,
    stable across redeliveries.
    """
    if not headers:
        return Message(id=f"nats:{topic}:{stream_seq}", topic=topic, payload=data)
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
        id=headers.pop(MSG_ID, "") or f"nats:{topic}:{stream_seq}",
        topic=topic,
        payload=data,
        key=headers.pop(KEY, None),
        type=headers.pop(TYPE, None),
        headers=headers,
    )


# --- URL -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NatsOptions:
    """Everything a ``nats://`` / ``tls://`` URL says. Secrets never appear in ``repr``."""

    host: str
    port: int
    tls: bool
    user: str | None = None
    password: str | None = None
    token: str | None = None
    ack_wait: float = 30.0
    storage: str = "file"
    max_age: float = 0.0
    max_bytes: int = -1
    max_msgs: int = -1
    duplicate_window: float = 120.0
    replicas: int = 1
    max_ack_pending: int = 20_000
    connect_timeout: float = 2.0
    connect_attempts: int = 3
    timeout: float = 5.0
    retry_timeout: float = 30.0
    name: str = "herald"
    creds: str | None = None
    nkey: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None

    def __repr__(self) -> str:
        return f"NatsOptions(host={self.host!r}, port={self.port}, tls={self.tls})"

    def safe_url(self) -> str:
        """The URL for logs and errors: any password or token replaced by ``***``."""
        scheme = "tls" if self.tls else "nats"
        auth = ""
        if self.user is not None:
            auth = f"{self.user}:***@" if self.password is not None else f"{self.user}@"
        elif self.token is not None:
            auth = "***@"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{auth}{host}:{self.port}"


def _seconds(name: str, raw: str, *, zero_ok: bool) -> float:
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero_ok):
        bound = ">= 0" if zero_ok else "> 0"
        raise ValueError(f"NATS URL option {name} must be a number of seconds {bound}, not {raw!r}")
    return value


def _integer(name: str, raw: str, *, minimum: int) -> int:
    try:
        value = int(raw)
    except ValueError:
        value = minimum - 1
    if value < minimum:
        raise ValueError(f"NATS URL option {name} must be an integer >= {minimum}, not {raw!r}")
    return value


_SECONDS = {  # option -> zero allowed
    "ack_wait": False,
    "max_age": True,
    "duplicate_window": False,
    "connect_timeout": False,
    "timeout": False,
    "retry_timeout": False,
}
_INTEGERS = {
    "max_bytes": -1,
    "max_msgs": -1,
    "replicas": 1,
    "max_ack_pending": 1,
    "connect_attempts": 1,
}
_STRINGS = ("name", "creds", "nkey", "tls_ca", "tls_cert", "tls_key")


def parse_url(url: str) -> NatsOptions:
    """Parse a ``nats://`` or ``tls://`` URL; ``ValueError`` (without secrets) if malformed."""
    if not isinstance(url, str) or "://" not in url:
        raise ValueError("not a NATS URL: expected nats://[user:password@]host[:port][?options]")
    scheme = url.split("://", 1)[0].lower()
    if scheme not in ("nats", "tls"):
        raise ValueError(f"not a NATS URL scheme: {scheme!r} (expected nats:// or tls://)")
    try:
        parts = urlsplit(url)
        port = parts.port or 4222
    except ValueError as e:
        raise ValueError(f"malformed NATS URL (host or port): {e}") from None
    host = parts.hostname
    if not host:
        raise ValueError("NATS URL has no host: expected nats://host[:port]")
    if "," in (parts.netloc or ""):
        raise ValueError("NATS URL takes one server (host:port); a list is not supported")
    if parts.path not in ("", "/"):
        raise ValueError("NATS URL takes no path; put options in the query string")
    user = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password is not None else None
    token = None
    if user is not None and password is None:
        token, user = user, None  # nats://TOKEN@host, as every NATS client reads it
    kwargs: dict[str, object] = {}
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key in kwargs:
            raise ValueError(f"NATS URL option {key} given twice")
        if key in _SECONDS:
            kwargs[key] = _seconds(key, value, zero_ok=_SECONDS[key])
        elif key in _INTEGERS:
            kwargs[key] = _integer(key, value, minimum=_INTEGERS[key])
        elif key in _STRINGS:
            if not value:
                raise ValueError(f"NATS URL option {key} is empty")
            kwargs[key] = value
        elif key == "storage":
            if value not in ("file", "memory"):
                raise ValueError(f"NATS URL option storage must be file or memory, not {value!r}")
            kwargs[key] = value
        elif key == "retention":
            # interest/workqueue retention would drop messages no group has read yet, breaking
            # publish-before-subscribe and replay; only limits keep the contract.
            if value != "limits":
                raise ValueError(
                    f"NATS URL option retention must be 'limits' (bounded with max_age, "
                    f"max_bytes, max_msgs), not {value!r}"
                )
        else:
            known = sorted([*_SECONDS, *_INTEGERS, *_STRINGS, "storage", "retention"])
            raise ValueError(f"unknown NATS URL option {key!r}; known: {', '.join(known)}")
    return NatsOptions(
        host=host,
        port=port,
        tls=scheme == "tls",
        user=user,
        password=password,
        token=token,
        **kwargs,  # type: ignore[arg-type]
    )
