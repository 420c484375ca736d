"""Parsing and redacting ``kafka://`` URLs (options: :mod:`herald.transports.kafka.transport`)."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from herald.transports.connecting import CONNECT_TIMEOUT

__all__ = ["parse_url", "redact_url"]

_CREDENTIALS = re.compile(r"(://[^/@:]*):[^/@]*@")


def redact_url(url: str) -> str:
    """``url`` with the password replaced by ``***`` (handles several ``host:port``, which
    :func:`herald.transports.redact_url` cannot parse)."""
    return _CREDENTIALS.sub(r"\1:***@", url, count=1)


_HOST = re.compile(r"^[A-Za-z0-9_.\-]+:\d{1,5}$|^\[[0-9A-Fa-f:.]+\]:\d{1,5}$")
_INT_OPTIONS = {
    "partitions": (1, 100_000, 4),
    "replication": (1, 1000, 1),
    "session_timeout_ms": (100, 3_600_000, 6_000),
    "heartbeat_interval_ms": (10, 3_600_000, 1_000),
    "max_request_size": (1024, 1 << 30, 1_048_576),
    "linger_ms": (0, 60_000, 0),
    "fetch_max": (1, 1_000_000, 500),
    "rebalance_timeout_ms": (100, 3_600_000, 10_000),
}
_FLOAT_OPTIONS = {"connect_timeout": CONNECT_TIMEOUT, "join_timeout": 60.0, "commit_timeout": 30.0}
_CHOICES = {
    "security_protocol": ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"),
    "sasl_mechanism": ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"),
    "idempotence": ("auto", "true", "false"),
    "isolation_level": ("read_uncommitted", "read_committed"),
    "strict_attempts": ("true", "false"),
}
_STR_OPTIONS = ("client_id", "ssl_cafile")


def parse_url(url: str) -> tuple[list[str], dict[str, Any]]:
    """The broker addresses and the options (defaults filled in) of a ``kafka://`` URL;
    credentials come back as ``_user``/``_password``. Raises ``ValueError`` with the URL
    redacted."""
    try:
        parts = urlsplit(url)
    except ValueError as e:
        raise ValueError(f"malformed Kafka URL {redact_url(url)!r}: {e}") from None
    if parts.scheme.lower() != "kafka":
        raise ValueError(f"not a Kafka URL: {redact_url(url)!r} (expected kafka://host:port)")
    netloc = parts.netloc.rpartition("@")[2]
    hosts = [h.strip() for h in netloc.split(",") if h.strip()]
    if not hosts:
        raise ValueError(f"Kafka URL {redact_url(url)!r} names no broker (kafka://host:port)")
    for h in hosts:
        if not _HOST.match(h) or not 0 < int(h.rsplit(":", 1)[1]) < 65536:
            raise ValueError(f"bad broker address {h!r} in {redact_url(url)!r}: use host:port")
    if parts.path not in ("", "/"):
        raise ValueError(f"Kafka URL {redact_url(url)!r} takes no path")
    options: dict[str, Any] = {}
    for name, (_lo, _hi, default) in _INT_OPTIONS.items():
        options[name] = default
    options.update(_FLOAT_OPTIONS)
    options.update(
        security_protocol="PLAINTEXT",
        sasl_mechanism="PLAIN",
        idempotence="auto",
        isolation_level="read_uncommitted",
        strict_attempts="false",
        client_id="herald",
        ssl_cafile=None,
    )
    for name, value in parse_qsl(parts.query, keep_blank_values=True, strict_parsing=False):
        if name in _INT_OPTIONS:
            lo, hi, _ = _INT_OPTIONS[name]
            try:
                n = int(value)
            except ValueError:
                raise ValueError(f"Kafka URL option {name}={value!r} is not an integer") from None
            if not lo <= n <= hi:
                raise ValueError(f"Kafka URL option {name}={n} is outside {lo}..{hi}")
            options[name] = n
        elif name in _FLOAT_OPTIONS:
            try:
                f = float(value)
            except ValueError:
                raise ValueError(f"Kafka URL option {name}={value!r} is not a number") from None
            if not 0 < f <= 3600:
                raise ValueError(f"Kafka URL option {name}={f} is outside (0, 3600]")
            options[name] = f
        elif name in _CHOICES:
            v = value.upper() if name in ("security_protocol", "sasl_mechanism") else value
            v = v.lower() if name not in ("security_protocol", "sasl_mechanism") else v
            if v not in _CHOICES[name]:
                raise ValueError(
                    f"Kafka URL option {name}={value!r}: use one of {', '.join(_CHOICES[name])}"
                )
            options[name] = v
        elif name in _STR_OPTIONS:
            options[name] = value
        else:
            raise ValueError(
                f"unknown Kafka URL option {name!r}; known: "
                + ", ".join(sorted([*_INT_OPTIONS, *_FLOAT_OPTIONS, *_CHOICES, *_STR_OPTIONS]))
            )
    if options["heartbeat_interval_ms"] >= options["session_timeout_ms"]:
        raise ValueError("Kafka URL: heartbeat_interval_ms must be below session_timeout_ms")
    if parts.username is not None:
        options["_user"] = unquote(parts.username)
        options["_password"] = unquote(parts.password or "")
        if not options["security_protocol"].startswith("SASL"):
            raise ValueError(
                f"Kafka URL {redact_url(url)!r} has credentials but security_protocol is "
                f"{options['security_protocol']}: add ?security_protocol=SASL_SSL "
                "(or SASL_PLAINTEXT)"
            )
    elif options["security_protocol"].startswith("SASL"):
        raise ValueError(f"Kafka URL {redact_url(url)!r}: SASL needs user:password@ in the URL")
    return hosts, options
