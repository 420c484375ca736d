"""What an ``amqp://`` / ``amqps://`` URL asks for: :class:`Options` and :func:`parse_url`."""

from __future__ import annotations

import math
import ssl
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, unquote, urlsplit

from herald.transports import redact_url
from herald.transports.connecting import CONNECT_TIMEOUT
from herald.transports.rabbitmq.wire import MAX_NAME

__all__ = ["Options", "parse_url"]

#: Query parameters passed through to the AMQP client for TLS and heartbeats.
_CLIENT_PARAMS = frozenset(
    {"cafile", "capath", "certfile", "keyfile", "no_verify_ssl", "heartbeat"}
)


@dataclass(frozen=True)
class Options:
    """What a ``amqp://`` / ``amqps://`` URL asks for."""

    #: The URL handed to the AMQP client (credentials included; never log it).
    client_url: str
    #: The URL with the password replaced by ``***``.
    redacted: str
    #: Seconds :meth:`connect` keeps retrying an unreachable broker before giving up.
    connect_timeout: float = CONNECT_TIMEOUT
    #: group -> routing-key patterns its queue is bound with (default: ``["#"]``, everything).
    bindings: dict[str, list[str]] = field(default_factory=dict)

    @property
    def address(self) -> tuple[str, int]:
        """The broker's host and port."""
        parts = urlsplit(self.client_url)
        tls = parts.scheme.lower() == "amqps"
        return parts.hostname or "localhost", parts.port or (5671 if tls else 5672)

    def ssl_context(self) -> ssl.SSLContext | None:
        """For ``amqps://``: the TLS context the client library gets, made from the URL's
        ``cafile``, ``capath``, ``certfile``, ``keyfile``, ``no_verify_ssl`` the way aiormq
        would make it, so Herald's TLS check and the connection agree. ``None`` for ``amqp://``."""
        parts = urlsplit(self.client_url)
        if parts.scheme.lower() != "amqps":
            return None
        q = dict(parse_qsl(parts.query))
        ctx = ssl.create_default_context(cafile=q.get("cafile"), capath=q.get("capath"))
        if q.get("certfile"):
            ctx.load_cert_chain(q["certfile"], q.get("keyfile"))
        if q.get("no_verify_ssl", "0") != "0":
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        return ctx


def parse_url(url: str) -> Options:
    """Parse ``amqp[s]://user:password@host:port/vhost?options``; ``ValueError`` if malformed.

    Options: ``connect_timeout`` (seconds, default 10: the budget of ``connect()``, see
    :mod:`herald.transports.connecting`), ``bind=GROUP:PATTERN`` (repeatable;
    binds that group's queue with an AMQP topic pattern instead of ``#``), and the TLS /
    heartbeat parameters of the AMQP client (``cafile``, ``capath``, ``certfile``,
    ``keyfile``, ``no_verify_ssl``, ``heartbeat``).
    """
    safe = redact_url(url) if isinstance(url, str) else repr(url)
    if not isinstance(url, str):
        raise ValueError(f"not a RabbitMQ URL: {safe}")
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises ValueError for a bad port
    except ValueError as e:
        raise ValueError(f"malformed RabbitMQ URL {safe!r}: {e}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("amqp", "amqps"):
        raise ValueError(f"not a RabbitMQ URL: {safe!r} (expected amqp:// or amqps://)")
    if not parts.hostname:
        raise ValueError(f"RabbitMQ URL {safe!r} has no host")
    if parts.fragment:
        raise ValueError(f"RabbitMQ URL {safe!r} must not have a #fragment")
    path = parts.path
    if path.count("/") > 1:
        raise ValueError(f"RabbitMQ URL {safe!r}: the path is the vhost; write '/' as %2F")
    connect_timeout = CONNECT_TIMEOUT
    bindings: dict[str, list[str]] = {}
    passthrough: list[tuple[str, str]] = []
    for name, value in parse_qsl(parts.query, keep_blank_values=True, strict_parsing=False):
        if name == "connect_timeout":
            try:
                connect_timeout = float(value)
            except ValueError:
                connect_timeout = -1.0
            if not (0 < connect_timeout <= 3600) or math.isnan(connect_timeout):
                raise ValueError(
                    f"connect_timeout must be > 0 and <= 3600 seconds, got {value!r} in {safe!r}"
                )
        elif name == "bind":
            group, sep, pattern = value.partition(":")
            if not sep or not group or not pattern:
                raise ValueError(f"bind must be GROUP:PATTERN, got {value!r} in {safe!r}")
            if len(pattern.encode()) > MAX_NAME:
                raise ValueError(f"bind pattern longer than {MAX_NAME} bytes in {safe!r}")
            bindings.setdefault(group, []).append(pattern)
        elif name in _CLIENT_PARAMS:
            passthrough.append((name, value))
        else:
            raise ValueError(
                f"unknown RabbitMQ URL option {name!r} in {safe!r}; known: connect_timeout, "
                "bind, " + ", ".join(sorted(_CLIENT_PARAMS))
            )
    # rebuild for the client: only the options it understands
    netloc = parts.netloc
    query = "&".join(f"{k}={v}" for k, v in passthrough)
    client_url = f"{scheme}://{netloc}{path or '/'}" + (f"?{query}" if query else "")
    if unquote(path[1:]) == "" and path not in ("", "/"):
        raise ValueError(f"RabbitMQ URL {safe!r} has an empty vhost")
    return Options(client_url, redact_url(url), connect_timeout, bindings)
