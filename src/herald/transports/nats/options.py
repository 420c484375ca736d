"""What a ``nats://`` / ``tls://`` URL asks for: :class:`NatsOptions` and :func:`parse_url`."""

from __future__ import annotations

import math
from dataclasses import dataclass
from urllib.parse import parse_qsl, unquote, urlsplit

from herald.transports.connecting import CONNECT_TIMEOUT

__all__ = ["NatsOptions", "parse_url"]


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
    connect_timeout: float = CONNECT_TIMEOUT
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
