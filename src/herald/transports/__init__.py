"""Transports, chosen by URL scheme. Engines load lazily so the core installs light."""

from __future__ import annotations

import importlib

from herald.transports.base import (
    Delivery,
    Features,
    GroupInfo,
    PermanentTransportError,
    Start,
    Subscription,
    TopicInfo,
    Transport,
    TransportError,
    validate_name,
)

__all__ = [
    "SCHEMES",
    "Delivery",
    "Features",
    "GroupInfo",
    "PermanentTransportError",
    "Start",
    "Subscription",
    "TopicInfo",
    "Transport",
    "TransportError",
    "open_transport",
    "redact_url",
    "validate_name",
]

#: URL scheme -> "module:Class".
SCHEMES: dict[str, str] = {
    "memory": "herald.transports.memory:MemoryTransport",
    "sqlite": "herald.transports.sqlite:SqliteTransport",
    "redis": "herald.transports.redis:RedisTransport",
    "rediss": "herald.transports.redis:RedisTransport",
    "amqp": "herald.transports.rabbitmq:RabbitMQTransport",
    "amqps": "herald.transports.rabbitmq:RabbitMQTransport",
    "kafka": "herald.transports.kafka:KafkaTransport",
    "nats": "herald.transports.nats:NatsTransport",
    "tls": "herald.transports.nats:NatsTransport",
    "mqtt": "herald.transports.mqtt:MqttTransport",
    "mqtts": "herald.transports.mqtt:MqttTransport",
}
#: module -> the pip extra that installs its client library
EXTRAS: dict[str, str] = {
    "herald.transports.redis": "redis",
    "herald.transports.rabbitmq": "rabbitmq",
    "herald.transports.kafka": "kafka",
    "herald.transports.nats": "nats",
    "herald.transports.mqtt": "mqtt",
}


def open_transport(url: str) -> Transport:
    """Build (without connecting) the transport for ``url``.

    Raises ``ValueError`` naming the supported schemes when the scheme is unknown, and
    ``ImportError`` naming the extra to install when the engine's client library is missing.
    """
    if not isinstance(url, str) or "://" not in url:
        raise ValueError(
            f"broker URL {redact_url(str(url))!r} has no scheme; supported: "
            + ", ".join(f"{s}://" for s in sorted(SCHEMES))
        )
    scheme = url.split("://", 1)[0].lower()
    target = SCHEMES.get(scheme)
    if target is None:
        raise ValueError(
            f"unknown broker URL scheme {scheme!r} in {redact_url(url)!r}; supported: "
            + ", ".join(f"{s}://" for s in sorted(SCHEMES))
        )
    module_name, _, cls_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name == module_name or module_name not in EXTRAS:
            raise ImportError(f"the {scheme}:// transport is not available: {e}") from e
        raise ImportError(
            f"the {scheme}:// transport needs its client library: "
            f"pip install 'herald[{EXTRAS[module_name]}]' ({e})"
        ) from e
    cls: type[Transport] = getattr(module, cls_name)
    return cls.from_url(url)


def redact_url(url: str) -> str:
    """Return ``url`` with the password (if any) replaced by ``***``.

    Works on the raw text, so multi-host URLs (``kafka://u:p@a:9092,b:9092``) and URLs whose
    port is not a number are redacted too; a ``password=`` query parameter is redacted as well.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    authority, slash, tail = rest.partition("/")
    if "?" in authority and not slash:  # no path: the query follows the authority
        authority, q, query_part = authority.partition("?")
        tail, slash = f"?{query_part}", ""
    userinfo, at, hosts = authority.rpartition("@")
    if at and ":" in userinfo:
        authority = f"{userinfo.split(':', 1)[0]}:***@{hosts}"
    path, q, query = tail.partition("?")
    if q:
        query = "&".join(
            f"{k}=***" if k.lower() in _SECRET_PARAMS else item
            for item in query.split("&")
            for k in (item.partition("=")[0],)
        )
    return f"{scheme}://{authority}{slash}{path}{q}{query}"


_SECRET_PARAMS = {"password", "sasl_password", "token", "secret"}
