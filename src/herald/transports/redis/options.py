"""The Redis transport's URL options (see :mod:`herald.transports.redis.transport`).

Plain data and pure functions, no I/O: how a ``redis://`` / ``rediss://`` URL is parsed and
validated into :class:`RedisOptions`, and the consumer name each subscription joins its group
under. The options themselves are documented in the module docstring of
:mod:`herald.transports.redis.transport`.
"""

from __future__ import annotations

import math
import os
import secrets
import socket
import ssl as _ssl
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from herald.transports import redact_url
from herald.transports.connecting import CONNECT_TIMEOUT

__all__ = ["RedisOptions", "consumer_name", "parse_url"]


@dataclass(frozen=True, slots=True)
class RedisOptions:
    host: str
    port: int
    db: int
    username: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)
    tls: bool = False
    visibility_timeout: float = 30.0
    claim_interval: float = 0.5
    retention: str = "keep"
    maxlen: int | None = None
    max_age: float | None = None
    reconnect_timeout: float = 30.0
    connect_timeout: float = CONNECT_TIMEOUT
    socket_timeout: float = 10.0
    ssl: dict[str, Any] = field(default_factory=dict)

    def ssl_context(self) -> _ssl.SSLContext | None:
        """For ``rediss://``: a TLS context with the settings redis-py applies to its own (so
        Herald's TLS check before connecting accepts and refuses what redis-py would)."""
        if not self.tls:
            return None
        o = self.ssl
        modes = {"required": _ssl.CERT_REQUIRED, "optional": _ssl.CERT_OPTIONAL}
        verify = modes.get(o.get("ssl_cert_reqs", "required"), _ssl.CERT_NONE)
        ctx = _ssl.create_default_context()
        ctx.check_hostname = bool(o.get("ssl_check_hostname", True)) and verify != _ssl.CERT_NONE
        ctx.verify_mode = verify
        if o.get("ssl_certfile"):
            ctx.load_cert_chain(str(o["ssl_certfile"]), o.get("ssl_keyfile"))
        if o.get("ssl_ca_certs"):
            ctx.load_verify_locations(cafile=o["ssl_ca_certs"])
        return ctx


_SECONDS = {
    "visibility_timeout": 0.0,
    "claim_interval": 0.0,
    "max_age": 0.0,
    "connect_timeout": 0.0,
    "socket_timeout": 0.0,
}
_SSL_OPTIONS = (
    "ssl_ca_certs",
    "ssl_certfile",
    "ssl_keyfile",
    "ssl_cert_reqs",
    "ssl_check_hostname",
)
_KNOWN = sorted(
    [*_SECONDS, "reconnect_timeout", "retention", "maxlen", *_SSL_OPTIONS],
)


def parse_url(url: str) -> RedisOptions:
    """Parse and validate a ``redis://`` / ``rediss://`` URL; ``ValueError`` says what is wrong
    (never quoting the password)."""
    safe = redact_url(url) if isinstance(url, str) else repr(url)
    if not isinstance(url, str):
        raise ValueError(f"not a redis URL: {safe}")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise ValueError(f"malformed redis URL {safe!r}: {e}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("redis", "rediss"):
        raise ValueError(f"not a redis URL: {safe!r}; expected redis:// or rediss://")
    if parts.fragment:
        raise ValueError(f"redis URL {safe!r} must not have a #fragment")
    path = parts.path.strip("/")
    try:
        db = int(path) if path else 0
        if db < 0:
            raise ValueError
    except ValueError:
        raise ValueError(
            f"redis URL {safe!r}: the path must be a database number, like /0"
        ) from None
    options: dict[str, Any] = {}
    ssl: dict[str, Any] = {}
    try:
        pairs = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=True)
    except ValueError:
        raise ValueError(f"redis URL {safe!r} has a malformed query string") from None
    seen: set[str] = set()
    for name, raw in pairs if parts.query else []:
        if name in seen:
            raise ValueError(f"redis URL option {name!r} is given twice")
        seen.add(name)
        if name in _SECONDS:
            options[name] = _seconds(name, raw, allow_zero=False)
        elif name == "reconnect_timeout":
            options[name] = _seconds(name, raw, allow_zero=True)
        elif name == "maxlen":
            try:
                n = int(raw)
            except ValueError:
                n = 0
            if n < 1:
                raise ValueError(f"redis URL option maxlen={raw!r} must be a whole number >= 1")
            options[name] = n
        elif name == "retention":
            if raw not in ("keep", "acked"):
                raise ValueError(f"redis URL option retention={raw!r} must be keep or acked")
            options[name] = raw
        elif name in _SSL_OPTIONS:
            if scheme != "rediss":
                raise ValueError(f"redis URL option {name!r} needs rediss:// (TLS)")
            if name == "ssl_cert_reqs":
                if raw not in ("required", "optional", "none"):
                    raise ValueError(
                        f"redis URL option ssl_cert_reqs={raw!r} must be required, optional or none"
                    )
                ssl[name] = raw
            elif name == "ssl_check_hostname":
                if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(
                        f"redis URL option ssl_check_hostname={raw!r} must be true or false"
                    )
                ssl[name] = raw.lower() in ("true", "1", "yes")
            else:
                ssl[name] = raw
        else:
            raise ValueError(f"unknown redis URL option {name!r}; known: {', '.join(_KNOWN)}")
    if "maxlen" in options and "max_age" in options:
        raise ValueError("redis URL options maxlen and max_age exclude each other; choose one")
    return RedisOptions(
        host=parts.hostname or "localhost",
        port=port or 6379,
        db=db,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password is not None else None,
        tls=scheme == "rediss",
        ssl=ssl,
        **options,
    )


def _seconds(name: str, raw: str, *, allow_zero: bool) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"redis URL option {name}={raw!r} is not a number of seconds") from None
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"redis URL option {name}={raw!r} must be a finite number {bound}")
    return value


def consumer_name() -> str:
    host = socket.gethostname().replace(" ", "_")[:64] or "host"
    return f"{host}-{os.getpid()}-{secrets.token_hex(4)}"
