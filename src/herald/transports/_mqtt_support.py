"""Helpers of the MQTT transport: URL options, the wire format, and member slots.

Kept apart from :mod:`herald.transports.mqtt` so that file holds only the connection logic.
Nothing here does network I/O.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import re
import socket
import ssl
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from herald.message import CONTENT_TYPE, Message, new_id
from herald.transports import redact_url

__all__ = [
    "ATTEMPT_PROP",
    "ID_PROP",
    "KEY_PROP",
    "MAX_MQTT_PACKET",
    "NOT_BEFORE_PROP",
    "TYPE_PROP",
    "MqttOptions",
    "Slot",
    "acquire_slot",
    "client_id",
    "decode_message",
    "encode_properties",
    "parse_url",
]

#: MQTT's largest packet ("remaining length" of 268,435,455 bytes), topic and properties included.
MAX_MQTT_PACKET = 268_435_455
#: Room kept for the topic and properties when deriving the largest payload from a packet limit.
_ENVELOPE_RESERVE = 64 * 1024

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
#: Journal size (bytes) past which it is rewritten with only the outstanding entries.
_JOURNAL_REWRITE = 1 << 20

_MEMBER = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
_PREFIX = re.compile(r"^([A-Za-z0-9_.\-]+/)*$")


@dataclass(frozen=True, slots=True)
class MqttOptions:
    """Everything a ``mqtt://`` / ``mqtts://`` URL says. ``password`` never leaves this object
    except into the client's CONNECT packet."""

    url: str  # redacted
    host: str
    port: int
    tls: bool
    username: str | None = None
    password: str | None = field(default=None, repr=False)  # never in a repr or log
    prefix: str = ""
    member: str = ""
    session_expiry: int = 86_400
    prefetch: int = 1000
    connect_timeout: float = 5.0
    connect_retries: int = 3
    reconnect_timeout: float = 30.0
    max_payload: int = MAX_MQTT_PACKET - _ENVELOPE_RESERVE
    ca_file: str | None = None
    tls_insecure: bool = False

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context for ``mqtts://`` (system CAs, or ``ca_file``), else ``None``."""
        if not self.tls:
            return None
        ctx = ssl.create_default_context(cafile=self.ca_file)
        if self.tls_insecure:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        return ctx


def _number(name: str, raw: str, *, integer: bool, low: float, high: float) -> Any:
    try:
        value: float = int(raw) if integer else float(raw)
    except ValueError:
        kind = "an integer" if integer else "a number"
        raise ValueError(f"mqtt URL option {name}={raw!r} is not {kind}") from None
    if not (math.isfinite(value) and low <= value <= high):
        raise ValueError(f"mqtt URL option {name}={raw!r} must be between {low:g} and {high:g}")
    return value


def _default_member() -> str:
    name = re.sub(r"[^A-Za-z0-9_.\-]", "-", socket.gethostname())[:64]
    return name or "host"


def parse_url(url: str) -> MqttOptions:
    """Parse ``mqtt[s]://[user[:password]@]host[:port][/]?option=value&...``.

    Raises ``ValueError`` naming the problem; the password never appears in the message.
    """
    if not isinstance(url, str):
        raise ValueError(f"mqtt URL must be a string, not {type(url).__name__}")
    safe = redact_url(url)
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise ValueError(f"malformed mqtt URL {safe!r}: {str(e).replace(url, safe)}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("mqtt", "mqtts"):
        raise ValueError(f"not an mqtt URL: {safe!r}; expected mqtt://host:1883 or mqtts://")
    if not parts.hostname:
        raise ValueError(f"mqtt URL {safe!r} names no host")
    if parts.path not in ("", "/"):
        raise ValueError(f"mqtt URL {safe!r} has a path; use the prefix= option for a topic prefix")
    if parts.fragment:
        raise ValueError(f"mqtt URL {safe!r} must not have a #fragment")
    tls = scheme == "mqtts"
    opts: dict[str, Any] = {}
    try:
        pairs = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=True)
    except ValueError:
        raise ValueError(f"mqtt URL {safe!r} has a malformed query string") from None
    if not parts.query:
        pairs = []
    for name, raw in pairs:
        if name in opts:
            raise ValueError(f"mqtt URL option {name!r} is given twice")
        if name == "prefix":
            if not _PREFIX.fullmatch(raw):
                raise ValueError(
                    f"mqtt URL option prefix={raw!r} must be topic levels of A-Z a-z 0-9 _ . - "
                    "each ending in '/', e.g. prefix=herald/"
                )
            opts[name] = raw
        elif name == "member":
            if not _MEMBER.fullmatch(raw):
                raise ValueError(
                    f"mqtt URL option member={raw!r} must be 1-64 of A-Z a-z 0-9 _ . -"
                )
            opts[name] = raw
        elif name == "session_expiry":
            opts[name] = _number(name, raw, integer=True, low=1, high=0xFFFFFFFE)
        elif name == "prefetch":
            opts[name] = _number(name, raw, integer=True, low=1, high=65535)
        elif name == "connect_retries":
            opts[name] = _number(name, raw, integer=True, low=1, high=100)
        elif name in ("connect_timeout", "reconnect_timeout"):
            opts[name] = _number(name, raw, integer=False, low=0.01, high=3600)
        elif name == "max_payload":
            opts[name] = _number(name, raw, integer=True, low=1, high=MAX_MQTT_PACKET)
        elif name == "ca_file":
            if not tls:
                raise ValueError("mqtt URL option ca_file needs mqtts://")
            opts[name] = raw
        elif name == "tls_insecure":
            if raw.lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"mqtt URL option tls_insecure={raw!r} must be true or false")
            if not tls:
                raise ValueError("mqtt URL option tls_insecure needs mqtts://")
            opts[name] = raw.lower() in ("true", "1")
        else:
            raise ValueError(
                f"unknown mqtt URL option {name!r}; known: ca_file, connect_retries, "
                "connect_timeout, max_payload, member, prefetch, prefix, reconnect_timeout, "
                "session_expiry, tls_insecure"
            )
    opts.setdefault("member", _default_member())
    return MqttOptions(
        url=safe,
        host=parts.hostname,
        port=port if port is not None else (8883 if tls else 1883),
        tls=tls,
        username=unquote(parts.username) if parts.username is not None else None,
        password=unquote(parts.password) if parts.password is not None else None,
        **opts,
    )


def client_id(prefix: str, topic: str, group: str, member: str, slot: int) -> str:
    """The stable MQTT client id of member ``member``'s ``slot``-th consumer of a group.

    Stable so that a restarted consumer resumes the persistent session (and with it the
    messages queued or left unacked there); hashed so any topic/group length fits.
    """
    digest = hashlib.sha256(f"{prefix}\0{topic}\0{group}".encode()).hexdigest()[:16]
    return f"herald-{digest}-{member}-{slot}"


# --- wire format ---------------------------------------------------------------------------


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


def decode_message(topic: str, payload: bytes, props: Properties | None) -> Incoming:
    """Turn a received PUBLISH into a :class:`Message`. A plain client's message (no
    ``x-herald-id``) gets a fresh id here; ``content_type`` comes from the MQTT 5 Content Type."""
    id_: str | None = None
    key = type_ = None
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


# --- member slots --------------------------------------------------------------------------


class Slot:
    """A consumer slot of a group on this host, held with an exclusive ``flock``.

    The lock file doubles as a journal of the message ids (and attempts) handed to the
    application and not yet acked. The OS drops the lock when the holding process dies (even
    by SIGKILL), so the next consumer of the group on this host takes the slot, resumes its
    MQTT session, and reads the journal to tell redelivered messages that really were handed
    out (attempt + 1) from ones that were only prefetched (same attempt).
    """

    def __init__(self, index: int, fd: int, previous: dict[str, int]) -> None:
        self.index = index
        self._fd = fd
        #: message id -> attempt handed out by an earlier owner of this slot (or by us)
        self.handed_out = previous
        self._written = 0

    def record(self, entries: list[tuple[str, int]]) -> None:
        """Note deliveries handed to the application (one append, no fsync: the journal must
        outlive the process, not the machine)."""
        for mid, attempt in entries:
            self.handed_out[mid] = attempt
        self._written += os.write(self._fd, "".join(f"{m} {a}\n" for m, a in entries).encode())

    def settled(self, message_id: str) -> None:
        """``message_id`` was acked or given back: it no longer counts as handed out."""
        self.handed_out.pop(message_id, None)
        if not self.handed_out:
            if self._written:
                os.ftruncate(self._fd, 0)
                self._written = 0
        elif self._written > _JOURNAL_REWRITE:
            # entries that never come back (acked just before a crash) would grow it forever
            os.ftruncate(self._fd, 0)
            self._written = 0
            self.record(list(self.handed_out.items()))

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # drops the flock
            self._fd = -1


def _slot_dir() -> str:
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    path = os.path.join(base, f"herald-mqtt-{os.getuid()}")
    os.makedirs(path, mode=0o700, exist_ok=True)
    return path


def acquire_slot(base_id: str, limit: int = 1024) -> Slot:
    """Take the lowest free slot for the client ids starting with ``base_id`` on this host."""
    directory = _slot_dir()
    for index in range(limit):
        fd = os.open(
            os.path.join(directory, f"{base_id}-{index}.slot"), os.O_RDWR | os.O_CREAT | os.O_APPEND
        )
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        previous: dict[str, int] = {}
        with os.fdopen(os.dup(fd), "rb") as f:
            for line in f.read().decode(errors="replace").splitlines():
                mid, _, attempt = line.partition(" ")
                if attempt.isdigit():
                    previous[mid] = int(attempt)
        os.ftruncate(fd, 0)
        slot = Slot(index, fd, {})
        if previous:  # keep what the previous owner left until its redeliveries are matched
            slot.record(list(previous.items()))
        return slot
    raise RuntimeError(f"more than {limit} consumers of one group in use on this host")
