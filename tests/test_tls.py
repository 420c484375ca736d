"""TLS with credentials against real servers, beyond Redis (``test_redis_transport.py`` has its
own): NATS JetStream (``tls://``) and MQTT (``mqtts://``).

Each test makes a throw-away self-signed certificate with the ``openssl`` CLI, starts a PRIVATE
server on a free loopback port with TLS and a user/password (never the shared servers), then
through Herald connects with the credentials and the CA file, publishes, consumes and acks, and
checks that the password shows neither in ``transport.url``, ``repr`` nor the logs, and that a
wrong password and a client that does not trust the certificate both fail with a clear
:class:`TransportError` (bounded retries, no hang) that does not show it either. The server is
stopped by the pid the test started, in a ``finally``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from herald.testing.conformance import drain, make_messages, unique_name
from herald.transports import Transport, open_transport

from .conftest import connect_fails, free_port, self_signed
from .private_servers import PrivateServer, require_binaries

pytestmark = pytest.mark.anyio

NATS_BIN = "/usr/sbin/nats-server"
MOSQUITTO_BIN = "/usr/sbin/mosquitto"
#: An upper bound for a failing connect with the small timeouts the tests put in their URLs.
FAIL_WITHIN = 15.0


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # nats-py is asyncio-only


async def _round_trip(t: Transport, topic: str) -> None:
    """Publish a few messages, then consume and ack them all through one subscription."""
    published = make_messages(topic, 5)
    await t.publish(topic, published)
    sub = await t.subscribe(topic, "g")
    try:
        seen = await drain(sub, [m.id for m in published], timeout=10)
        assert set(seen) == {m.id for m in published}
        assert [seen[m.id][0].message.payload for m in published] == [m.payload for m in published]
    finally:
        await sub.close()


def _assert_not_logged(caplog: pytest.LogCaptureFixture, secret: str) -> None:
    for record in caplog.records:
        assert secret not in record.getMessage()
        assert secret not in str(record.exc_info or "")


# --- NATS JetStream --------------------------------------------------------------------------

NATS_PASSWORD = "nats-tls-pass-4711"


async def test_nats_tls_with_credentials(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    require_binaries(NATS_BIN, "openssl")
    caplog.set_level(logging.DEBUG, logger="herald")
    cert, key = self_signed(tmp_path)
    store = tmp_path / "jetstream"
    port = free_port()
    server = PrivateServer(
        [NATS_BIN, "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", str(store),
         "--tls", "--tlscert", str(cert), "--tlskey", str(key),
         "--user", "app", "--pass", NATS_PASSWORD],
        port,
        tmp_path / "nats-server.log",
    )  # fmt: skip
    server.start()
    try:
        fast = "connect_timeout=2"
        base = f"tls://app:{NATS_PASSWORD}@127.0.0.1:{port}"
        t = open_transport(f"{base}?tls_ca={cert}&{fast}")
        assert NATS_PASSWORD not in t.url and "***" in t.url
        assert t.url.startswith("tls://")
        assert NATS_PASSWORD not in repr(t)
        async with t:
            await _round_trip(t, unique_name("secure"))

        # a wrong password: the server refuses it
        wrong = await connect_fails(
            f"tls://app:wrong-pass-1@127.0.0.1:{port}?tls_ca={cert}&{fast}",
            "wrong-pass-1",
            NATS_PASSWORD,
        )
        assert "authorization violation" in str(wrong).lower()
        # a client that does not trust the certificate (system CAs only)
        untrusted = await connect_fails(f"{base}?{fast}", NATS_PASSWORD)
        assert "certificate verify failed" in str(untrusted).lower()
        # nats:// against a server that requires TLS: nats-py upgrades with the system CAs
        plain = await connect_fails(
            f"nats://app:{NATS_PASSWORD}@127.0.0.1:{port}?{fast}", NATS_PASSWORD
        )
        assert "certificate verify failed" in str(plain).lower()
        _assert_not_logged(caplog, NATS_PASSWORD)
    finally:
        server.stop()
        shutil.rmtree(store, ignore_errors=True)


async def test_nats_tls_handshake_that_never_completes_is_bounded() -> None:
    """A server that announces TLS, then never answers the handshake: nats-py would wait
    forever after its failed upgrade (nats-io/nats.py#718); connect() gives up within its
    budget (connect_timeout) with a TransportError that says TLS and does not show the
    password."""
    info = b'INFO {"server_id":"fake","version":"2.9.10","tls_required":true}\r\n'
    writers: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        writer.write(info)
        await writer.drain()
        await reader.read(65536)  # the ClientHello, never answered

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        url = f"tls://app:{NATS_PASSWORD}@127.0.0.1:{port}?connect_timeout=1"
        started = time.monotonic()
        error = await connect_fails(url, NATS_PASSWORD)
        assert time.monotonic() - started < 3  # the budget, plus slack for a busy machine
        assert "cannot connect to NATS" in str(error) and "within 1s" in str(error)
        assert "TLS handshake" in str(error)
    finally:
        server.close()
        for w in writers:
            w.close()
        await server.wait_closed()


# --- MQTT (Mosquitto) ------------------------------------------------------------------------

MQTT_PASSWORD = "mqtt-tls-pass-0815"


def _mosquitto_config(tmp: Path, port: int, cert: Path, key: Path) -> Path:
    passwords = tmp / "passwd"
    subprocess.run(
        ["mosquitto_passwd", "-b", "-c", str(passwords), "app", MQTT_PASSWORD],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    lines = [
        f"listener {port} 127.0.0.1",
        f"cafile {cert}",
        f"certfile {cert}",
        f"keyfile {key}",
        f"password_file {passwords}",
        "allow_anonymous false",
        "persistence false",
        "log_dest stdout",
    ]
    if os.geteuid() == 0:
        lines.append("user root")  # else it drops to "mosquitto", which cannot read tmp_path
    config = tmp / "mosquitto.conf"
    config.write_text("\n".join(lines) + "\n")
    return config


async def test_mqtt_tls_with_credentials(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    require_binaries(MOSQUITTO_BIN, "mosquitto_passwd", "openssl")
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))  # member slot files stay in tmp_path
    caplog.set_level(logging.DEBUG)
    cert, key = self_signed(tmp_path)
    port = free_port()
    config = _mosquitto_config(tmp_path, port, cert, key)
    server = PrivateServer([MOSQUITTO_BIN, "-c", str(config)], port, tmp_path / "mosquitto.log")
    server.start()
    try:
        fast = "connect_timeout=2&member=tls-test"
        base = f"mqtts://app:{MQTT_PASSWORD}@127.0.0.1:{port}"
        t = open_transport(f"{base}?ca_file={cert}&{fast}")
        assert MQTT_PASSWORD not in t.url and "***" in t.url
        assert MQTT_PASSWORD not in repr(t)
        topic = unique_name("secure")
        async with t:
            # MQTT has no replay: the group must exist before the publish
            sub = await t.subscribe(topic, "g")
            published = make_messages(topic, 5)
            await t.publish(topic, published)
            try:
                seen = await drain(sub, [m.id for m in published], timeout=10)
                assert set(seen) == {m.id for m in published}
            finally:
                await sub.close()
            await t.delete_topic(topic)

        # a wrong password: the broker refuses it
        wrong = await connect_fails(
            f"mqtts://app:wrong-pass-2@127.0.0.1:{port}?ca_file={cert}&{fast}",
            "wrong-pass-2",
            MQTT_PASSWORD,
        )
        assert "not authorized" in str(wrong).lower()
        # a client that does not trust the certificate (system CAs only)
        untrusted = await connect_fails(f"{base}?{fast}", MQTT_PASSWORD)
        assert "certificate verify failed" in str(untrusted).lower()
        # a plain client against the TLS listener
        plain = await connect_fails(
            f"mqtt://app:{MQTT_PASSWORD}@127.0.0.1:{port}?{fast}", MQTT_PASSWORD
        )
        assert "speaks TLS" in str(plain) and "mqtts://" in str(plain)
        _assert_not_logged(caplog, MQTT_PASSWORD)
    finally:
        server.stop()


def test_mqtt_options_repr_hides_password() -> None:
    t = open_transport(f"mqtts://app:{MQTT_PASSWORD}@127.0.0.1:8883")
    assert MQTT_PASSWORD not in repr(t.options)  # type: ignore[attr-defined]
