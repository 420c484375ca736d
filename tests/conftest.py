"""Shared fixtures: the anyio backend and a transport-parameterised ``broker_url``.

``broker_url`` runs a test once per transport the core must behave identically on. Later
transports add their URL here; a transport whose server is unreachable is skipped locally with
a message saying so, and fails under CI (``CI=true``).
"""

from __future__ import annotations

import importlib.util
import socket
import subprocess
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import pytest

from herald.message import new_id
from herald.testing.servers import SERVERS, reachable, require_server
from herald.transports import TransportError, open_transport


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


#: transport -> URL for the shared App-level tests; each needs its server (herald.testing.servers)
BROKERS: dict[str, str] = {
    "memory": "memory://",
    "sqlite": "",  # a fresh file per test
    "redis": "redis://127.0.0.1:6379/0",
    "rabbitmq": "amqp://guest:guest@127.0.0.1:5672/",
    "kafka": "kafka://127.0.0.1:9092",
    "nats": "nats://127.0.0.1:4222",
    "mqtt": "mqtt://127.0.0.1:1883",
}
_MODULES = {
    "redis": "herald.transports.redis",
    "rabbitmq": "herald.transports.rabbitmq",
    "kafka": "herald.transports.kafka",
    "nats": "herald.transports.nats",
    "mqtt": "herald.transports.mqtt",
}


@pytest.fixture(params=list(BROKERS))
def broker_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Every transport the App must behave identically on. A transport not built yet is
    skipped; one whose server is down is skipped locally and fails in CI."""
    name = request.param
    if name == "sqlite":
        return f"sqlite:///{tmp_path / 'broker.db'}"
    module = _MODULES.get(name)
    if module is not None:
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"the {name} transport is not built yet")
        require_server(name)
    return BROKERS[name]


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'broker.db'}"


#: every topic name handed out by topic(); deleted from the servers at the end of the session
CREATED_TOPICS: list[str] = []


def topic() -> str:
    """A fresh topic name, removed from every server transport after the test session."""
    name = f"t.{new_id()[-12:]}"
    CREATED_TOPICS.append(name)
    return name


@pytest.fixture(scope="session", autouse=True)
def _delete_test_topics() -> Iterator[None]:
    """Leave no junk on the shared servers: each server transport deletes the session's topics
    (``delete_topic`` also removes what hangs off a topic: groups, delay queues, and the
    ``<topic>.*`` dead-letter/skipped topics it knows of)."""
    yield
    for name, module in _MODULES.items():
        if not CREATED_TOPICS or importlib.util.find_spec(module) is None:
            continue
        if not reachable(*SERVERS[name][:2]):
            continue

        async def cleanup(url: str = BROKERS[name]) -> None:
            async with open_transport(url) as transport:
                for t in CREATED_TOPICS:
                    await transport.delete_topic(t)

        anyio.run(cleanup)


async def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll ``predicate`` until true; fail the test after ``timeout`` seconds."""
    with anyio.fail_after(timeout):
        while not predicate():
            await anyio.sleep(0.01)


def free_port() -> int:
    """A loopback TCP port nothing listens on right now (for a private test server)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def self_signed(tmp: Path) -> tuple[Path, Path]:
    """A throw-away certificate for ``localhost`` / ``127.0.0.1`` (its own CA) and its key,
    made with the ``openssl`` CLI in ``tmp``."""
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return cert, key


def stop_process(proc: subprocess.Popen[bytes] | None) -> None:
    """Stop a private test server this test started: SIGTERM, then SIGKILL after 10 s."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


async def connect_fails(url: str, *secrets: str, within: float = 15.0) -> TransportError:
    """Connecting to ``url`` raises a :class:`TransportError` within ``within`` seconds whose
    text (message, repr and traceback) mentions none of ``secrets``; return it."""
    t = open_transport(url)
    started = time.monotonic()
    try:
        with pytest.raises(TransportError) as e:
            await t.connect()
    finally:
        await t.close()
    assert time.monotonic() - started < within
    text = "".join(traceback.format_exception(e.value)) + repr(e.value)
    for secret in secrets:
        assert secret not in text
    return e.value
