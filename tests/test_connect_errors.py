"""Connection and permission errors: the same rules on every transport
(:mod:`herald.transports.connecting`).

For every networked transport (Redis, RabbitMQ, NATS, Kafka, MQTT) and SQLite:

* wrong credentials, a missing permission, a missing virtual host, a bad credentials file and a
  TLS mismatch fail with one :class:`PermanentTransportError` at once: with the default
  10 s budget, in well under :data:`FAST` seconds;
* a closed port fails with one :class:`TransportError` (not permanent) within the budget the
  URL gives (``connect_timeout``), naming the redacted URL, the budget and the cause; a broker
  that comes up while ``connect()`` is still within its budget is connected to;
* every error is one line without the password, and the log holds at most :data:`LOG_LINES`
  records at INFO or above, across all loggers (the client libraries' own lines are demoted).

Servers with credentials or TLS are PRIVATE (started by the test on free ports, stopped by their
pid): nats-server, mosquitto and redis-server, a TLS terminator in front of the shared
RabbitMQ, a Tansu behind a TLS terminator for Kafka. Users made on the shared RabbitMQ and
Redis are throw-away ones, deleted in a ``finally``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import redis

from herald.testing.conformance import make_messages, unique_name
from herald.testing.servers import require_server
from herald.transports import PermanentTransportError, open_transport
from herald.transports.connecting import CONNECT_TIMEOUT

from .conftest import free_port, self_signed
from .connect_checks import (
    BUDGET,
    FAST,
    LOG_LINES,
    SECRET,
    SLACK,
    fails,
    tls_mismatches,
    tls_unanswered,
    with_query,
)
from .private_servers import (
    PrivateServer,
    late_forwarder,
    mosquitto_argv,
    require_binaries,
    tls_tansu,
    tls_terminator,
)

pytestmark = pytest.mark.anyio

NATS_BIN = "/usr/sbin/nats-server"
MOSQUITTO_BIN = "/usr/sbin/mosquitto"

#: the shared servers, by engine
SHARED = {
    "redis": "redis://127.0.0.1:6379/0",
    "rabbitmq": "amqp://guest:guest@127.0.0.1:5672/",
    "nats": "nats://127.0.0.1:4222",
    "kafka": "kafka://127.0.0.1:9092",
    "mqtt": "mqtt://127.0.0.1:1883",
}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # nats-py, aiormq and redis-py are asyncio-only


# --- unreachable -------------------------------------------------------------------------------

CLOSED = {
    "redis": "redis://u:{secret}@127.0.0.1:{port}/0",
    "rabbitmq": "amqp://u:{secret}@127.0.0.1:{port}/",
    "nats": "nats://u:{secret}@127.0.0.1:{port}",
    "kafka": "kafka://u:{secret}@127.0.0.1:{port}?security_protocol=SASL_PLAINTEXT",
    "mqtt": "mqtt://u:{secret}@127.0.0.1:{port}",
}


@pytest.mark.parametrize("engine", list(CLOSED))
async def test_closed_port_fails_within_the_budget_with_one_error(
    engine: str, caplog: pytest.LogCaptureFixture
) -> None:
    url = with_query(
        CLOSED[engine].format(secret=SECRET, port=free_port()), f"connect_timeout={BUDGET:g}"
    )
    error = await fails(url, caplog, permanent=False, within=BUDGET + SLACK)
    text = str(error)
    assert text.startswith("cannot connect to ") and f"within {BUDGET:g}s (connect_timeout)" in text
    assert "111" in text  # the cause: ECONNREFUSED, in each client library's words


def test_every_transport_has_the_same_default_budget() -> None:
    from herald.transports.kafka.options import parse_url as kafka_url
    from herald.transports.mqtt.options import parse_url as mqtt_url
    from herald.transports.nats.options import parse_url as nats_url
    from herald.transports.rabbitmq.options import parse_url as rabbitmq_url
    from herald.transports.redis.options import parse_url as redis_url

    assert CONNECT_TIMEOUT == 10.0
    assert redis_url("redis://h").connect_timeout == CONNECT_TIMEOUT
    assert rabbitmq_url("amqp://h/").connect_timeout == CONNECT_TIMEOUT
    assert nats_url("nats://h").connect_timeout == CONNECT_TIMEOUT
    assert kafka_url("kafka://h:9092")[1]["connect_timeout"] == CONNECT_TIMEOUT
    assert mqtt_url("mqtt://h").connect_timeout == CONNECT_TIMEOUT
    for url in ("nats://h?connect_attempts=2", "mqtt://h?connect_retries=2"):
        with pytest.raises(ValueError, match="unknown"):  # one option for the budget
            open_transport(url)


@pytest.mark.parametrize("engine", list(SHARED))
async def test_broker_that_comes_up_within_the_budget_is_connected(engine: str) -> None:
    """Transient errors are retried within connect_timeout: the port refuses connections for
    the first 2 s, then forwards to the real server."""
    require_server(engine)
    shared = urlsplit(SHARED[engine])
    port = free_port()
    url = with_query(SHARED[engine].replace(f":{shared.port}", f":{port}"), "connect_timeout=8")
    t = open_transport(url)
    async with late_forwarder(port, shared.port or 0, delay=2.0):
        started = time.monotonic()
        try:
            await t.connect()
            assert time.monotonic() - started >= 1.5  # it did wait for the port
        finally:
            await t.close()


# --- RabbitMQ ----------------------------------------------------------------------------------


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=60)


@contextlib.contextmanager
def _rabbitmq_user(name: str, password: str) -> Iterator[None]:
    """A throw-away RabbitMQ user without permissions, deleted afterwards."""
    require_binaries("rabbitmqctl")
    _rabbitmqctl("add_user", name, password)
    try:
        yield
    finally:
        _rabbitmqctl("delete_user", name)


async def test_rabbitmq_wrong_password_fails_at_once(caplog: pytest.LogCaptureFixture) -> None:
    require_server("rabbitmq")
    error = await fails(
        f"amqp://guest:{SECRET}@127.0.0.1:5672/", caplog, permanent=True, within=FAST
    )
    assert "refused the login" in str(error) and "ACCESS_REFUSED" in str(error)


async def test_rabbitmq_missing_vhost_fails_at_once(caplog: pytest.LogCaptureFixture) -> None:
    require_server("rabbitmq")
    vhost = unique_name("no-such-vhost")
    error = await fails(
        f"amqp://guest:guest@127.0.0.1:5672/{vhost}", caplog, permanent=True, within=FAST
    )
    assert f"virtual host {vhost!r}" in str(error) and "does not exist" in str(error)


async def test_rabbitmq_user_without_permissions(caplog: pytest.LogCaptureFixture) -> None:
    """A user with no permissions on the vhost is refused at connect; one whose permissions
    match nothing connects, and then its declare and publish fail at once (they were retried
    for 60 s, logging ~584 INFO lines)."""
    require_server("rabbitmq")
    user = unique_name("herald-noperm")
    with _rabbitmq_user(user, SECRET):
        url = f"amqp://{user}:{SECRET}@127.0.0.1:5672/"
        error = await fails(url, caplog, permanent=True, within=FAST)
        assert "no permissions on it" in str(error)

        _rabbitmqctl("set_permissions", "-p", "/", user, "^$", "^$", "^$")
        topic = unique_name("noperm")
        async with open_transport(url) as t:
            for action in ("publish", "subscribe"):
                caplog.clear()
                started = time.monotonic()
                with pytest.raises(PermanentTransportError) as info:
                    if action == "publish":
                        await t.publish(topic, make_messages(topic, 1))
                    else:
                        await t.subscribe(topic, "g")
                assert time.monotonic() - started < FAST
                assert "ACCESS_REFUSED" in str(info.value) and user in str(info.value)
                assert SECRET not in str(info.value)
                assert len([r for r in caplog.records if r.levelno >= logging.INFO]) <= LOG_LINES


async def test_rabbitmq_tls_mismatch_says_tls(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    require_server("rabbitmq")
    cert, key = self_signed(tmp_path)
    with tls_terminator(tmp_path, 5672, cert, key) as port:
        # trusted, through the terminator: works (the cafile option reaches the TLS check and
        # the client library alike)
        async with open_transport(f"amqps://guest:guest@127.0.0.1:{port}/?cafile={cert}"):
            pass
        await tls_mismatches(
            caplog,
            f"amqps://guest:{SECRET}@127.0.0.1:{port}/",
            f"amqp://guest:{SECRET}@127.0.0.1:{port}/",
            "cafile",
            "amqps://",
        )
    tls_to_plain = await fails(
        f"amqps://guest:{SECRET}@127.0.0.1:5672/", caplog, permanent=True, within=FAST
    )
    assert "TLS handshake" in str(tls_to_plain) and "amqp://" in str(tls_to_plain)


# --- Redis -------------------------------------------------------------------------------------


@contextlib.contextmanager
def _redis_user(name: str, *rules: str) -> Iterator[None]:
    """A throw-away ACL user on the shared Redis, deleted afterwards."""
    r = redis.Redis(host="127.0.0.1", port=6379)
    r.execute_command("ACL", "SETUSER", name, "reset", "on", f">{SECRET}", *rules)
    try:
        yield
    finally:
        r.execute_command("ACL", "DELUSER", name)
        r.close()


async def test_redis_wrong_password_and_missing_permissions(
    caplog: pytest.LogCaptureFixture,
) -> None:
    require_server("redis")
    user = unique_name("herald-acl")
    with _redis_user(user, "~*", "&*", "+@all"):
        error = await fails(
            f"redis://{user}:wrong-{SECRET}@127.0.0.1:6379/0", caplog, permanent=True, within=FAST
        )
        assert "WRONGPASS" in str(error)
    with _redis_user(user):  # no commands at all
        error = await fails(
            f"redis://{user}:{SECRET}@127.0.0.1:6379/0", caplog, permanent=True, within=FAST
        )
        assert "NOPERM" in str(error)
    with _redis_user(user, "~*", "+info", "+config|get"):  # connects, may not write
        async with open_transport(f"redis://{user}:{SECRET}@127.0.0.1:6379/0") as t:
            started = time.monotonic()
            with pytest.raises(PermanentTransportError) as info:
                await t.publish("t", make_messages("t", 1))
            assert time.monotonic() - started < FAST
            assert "NOPERM" in str(info.value) and SECRET not in str(info.value)


async def test_redis_without_the_password_it_requires(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    require_binaries("redis-server")
    port = free_port()
    argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", str(tmp_path), "--requirepass", SECRET]  # fmt: skip
    with PrivateServer(argv, port, tmp_path / "redis.log"):
        error = await fails(f"redis://127.0.0.1:{port}/0", caplog, permanent=True, within=FAST)
        assert "NOAUTH" in str(error) and "user:password@" in str(error)


async def test_redis_tls_mismatch_says_tls(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    require_binaries("redis-server", "openssl")
    cert, key = self_signed(tmp_path)
    port = free_port()
    argv = ["redis-server", "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
            "--save", "", "--appendonly", "no", "--dir", str(tmp_path),
            "--tls-cert-file", str(cert), "--tls-key-file", str(key),
            "--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no"]  # fmt: skip
    with PrivateServer(argv, port, tmp_path / "redis.log"):
        await tls_mismatches(
            caplog,
            f"rediss://:{SECRET}@127.0.0.1:{port}/0",
            f"redis://:{SECRET}@127.0.0.1:{port}/0",
            "ssl_ca_certs",
            "rediss://",
        )
    require_server("redis")
    # a plain Redis waits for more of what it takes for a command: the handshake gets no
    # answer, which is retried within the budget (a slow TLS server looks the same)
    await tls_unanswered(caplog, f"rediss://:{SECRET}@127.0.0.1:6379/0", "redis://")


# --- NATS --------------------------------------------------------------------------------------


async def test_nats_refused_credentials_fail_at_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    require_binaries(NATS_BIN)
    port = free_port()
    argv = [NATS_BIN, "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", str(tmp_path / "js"),
            "--user", "app", "--pass", SECRET]  # fmt: skip
    with PrivateServer(argv, port, tmp_path / "nats.log"):
        async with open_transport(f"nats://app:{SECRET}@127.0.0.1:{port}"):
            pass  # the right password works
        wrong = await fails(
            f"nats://app:wrong-{SECRET}@127.0.0.1:{port}", caplog, permanent=True, within=FAST
        )
        assert "authorization violation" in str(wrong).lower()
        anonymous = await fails(f"nats://127.0.0.1:{port}", caplog, permanent=True, within=FAST)
        assert "refused the credentials" in str(anonymous)
        missing = await fails(
            f"nats://127.0.0.1:{port}?creds={tmp_path / 'none.creds'}",
            caplog,
            permanent=True,
            within=FAST,
        )
        assert "cannot read the creds file" in str(missing)
        garbage = tmp_path / "garbage.creds"
        garbage.write_text("not a creds file\n")
        bad = await fails(
            f"nats://127.0.0.1:{port}?creds={garbage}", caplog, permanent=True, within=FAST
        )
        assert "creds file" in str(bad) and "JWT" in str(bad)


async def test_nats_tls_mismatch_says_tls(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    require_binaries(NATS_BIN, "openssl")
    cert, key = self_signed(tmp_path)
    port = free_port()
    argv = [NATS_BIN, "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", str(tmp_path / "js"),
            "--tls", "--tlscert", str(cert), "--tlskey", str(key)]  # fmt: skip
    with PrivateServer(argv, port, tmp_path / "nats.log"):
        untrusted = await fails(
            f"tls://u:{SECRET}@127.0.0.1:{port}", caplog, permanent=True, within=FAST
        )
        assert "TLS handshake" in str(untrusted) and "tls_ca" in str(untrusted)
        plain = await fails(  # nats-py upgrades a plain URL when the server requires TLS
            f"nats://u:{SECRET}@127.0.0.1:{port}", caplog, permanent=True, within=FAST
        )
        assert "TLS handshake" in str(plain)
    require_server("nats")
    tls_to_plain = await fails(
        f"tls://u:{SECRET}@127.0.0.1:4222", caplog, permanent=True, within=FAST
    )
    assert "does not offer TLS" in str(tls_to_plain)


# --- MQTT --------------------------------------------------------------------------------------


async def test_mqtt_refused_credentials_fail_at_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    require_binaries(MOSQUITTO_BIN, "mosquitto_passwd")
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))  # member slot files stay in tmp_path
    port = free_port()
    with PrivateServer(mosquitto_argv(tmp_path, port, SECRET), port, tmp_path / "mosquitto.log"):
        async with open_transport(f"mqtt://app:{SECRET}@127.0.0.1:{port}"):
            pass  # the right password works
        wrong = await fails(
            f"mqtt://app:wrong-{SECRET}@127.0.0.1:{port}", caplog, permanent=True, within=FAST
        )
        assert "not authorized" in str(wrong).lower()
        anonymous = await fails(f"mqtt://127.0.0.1:{port}", caplog, permanent=True, within=FAST)
        assert "refused the connection" in str(anonymous)


async def test_mqtt_tls_mismatch_says_tls(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    require_binaries(MOSQUITTO_BIN, "mosquitto_passwd", "openssl")
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    cert, key = self_signed(tmp_path)
    port = free_port()
    argv = mosquitto_argv(
        tmp_path, port, SECRET, f"cafile {cert}", f"certfile {cert}", f"keyfile {key}"
    )
    with PrivateServer(argv, port, tmp_path / "mosquitto.log"):
        await tls_mismatches(
            caplog,
            f"mqtts://app:{SECRET}@127.0.0.1:{port}",
            f"mqtt://app:{SECRET}@127.0.0.1:{port}",
            "ca_file",
            "mqtts://",
        )
    require_server("mqtt")
    tls_to_plain = await fails(
        f"mqtts://app:{SECRET}@127.0.0.1:1883", caplog, permanent=True, within=FAST
    )
    assert "TLS handshake" in str(tls_to_plain) and "mqtt://" in str(tls_to_plain)


# --- Kafka -------------------------------------------------------------------------------------


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-256", "SCRAM-SHA-512", "PLAIN"])
async def test_kafka_refused_sasl_login(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, mechanism: str
) -> None:
    """Tansu requires SASL (SCRAM only) with ``--authentication``; no user can be created on
    an authenticating memory broker, so "wrong credentials" are credentials it does not know:
    its SCRAM refusal is permanent. PLAIN it answers by closing the connection, which looks
    like any dropped connection: retried within the budget, then one error."""
    scram = mechanism.startswith("SCRAM")
    with tls_tansu(tmp_path, authentication=True) as broker:
        url = broker.url(
            f"security_protocol=SASL_SSL&sasl_mechanism={mechanism}&ssl_cafile={broker.cert}"
            + ("" if scram else f"&connect_timeout={BUDGET:g}"),
            credentials=f"app:{SECRET}@",
        )
        error = await fails(url, caplog, permanent=scram, within=FAST if scram else BUDGET + SLACK)
        assert "app:***@" in str(error)


async def test_kafka_tls_mismatch_says_tls(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with tls_tansu(tmp_path) as broker:
        await tls_mismatches(
            caplog,
            broker.url("security_protocol=SASL_SSL", credentials=f"app:{SECRET}@"),
            broker.url("security_protocol=SASL_PLAINTEXT", credentials=f"app:{SECRET}@"),
            "ssl_cafile",
            "security_protocol=SASL_SSL",
        )
    require_server("kafka")
    # Tansu waits for the rest of what it reads as a request: no answer, retried in the budget
    await tls_unanswered(
        caplog, "kafka://127.0.0.1:9092?security_protocol=SSL", "security_protocol=PLAINTEXT"
    )


# --- SQLite ------------------------------------------------------------------------------------


async def test_sqlite_path_that_cannot_be_a_database_fails_at_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    text_file = tmp_path / "notes.txt"
    text_file.write_text("this is not a database, but long enough to have a header. " * 10)
    cases = {
        f"sqlite:///{tmp_path}/missing/dir/broker.db": "does not exist",
        f"sqlite:///{text_file}": "not a database",
        f"sqlite:///{tmp_path}": "unable to open",  # a directory
    }
    for url, says in cases.items():
        error = await fails(url, caplog, permanent=True, within=FAST, secrets=())
        assert says in str(error)


# --- the CLI: one line ---------------------------------------------------------------------------


def test_cli_prints_one_line_for_a_missing_vhost() -> None:
    require_server("rabbitmq")
    broker = f"amqp://guest:guest@127.0.0.1:5672/{unique_name('no-such-vhost')}"
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", "from herald.cli import main; main()", "publish", "--broker",
         broker, "t", "{}"],
        capture_output=True, text=True, timeout=60, env={**os.environ, "COLUMNS": "400"},
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert time.monotonic() - started < 15  # an interpreter start, then at once
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "virtual host" in lines[0], done.stderr
    assert "guest:***@" in lines[0]
