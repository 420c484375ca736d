"""The MQTT transport's URL options (see :mod:`herald.transports.mqtt.transport`).

Plain data and pure functions, no I/O: how a ``mqtt://`` / ``mqtts://`` URL is parsed and
validated into :class:`MqttOptions`. The options themselves are documented in the module
docstring of :mod:`herald.transports.mqtt.transport`.
"""

from __future__ import annotations

import math
import re
import socket
import ssl
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from herald.transports import redact_url
from herald.transports.connecting import CONNECT_TIMEOUT

__all__ = ["MAX_MQTT_PACKET", "MqttOptions", "parse_url"]

#: MQTT's largest packet ("remaining length" of 268,435,455 bytes), topic and properties included.
MAX_MQTT_PACKET = 268_435_455
#: Room kept for the topic and properties when deriving the largest payload from a packet limit.
_ENVELOPE_RESERVE = 64 * 1024

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
    connect_timeout: float = CONNECT_TIMEOUT
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
                f"unknown mqtt URL option {name!r}; known: ca_file, "
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
