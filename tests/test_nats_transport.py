"""NATS-specific behaviour of ``nats://``: URL and options, secrets, an unreachable server,
interop with plain nats-py both ways, Nats-Msg-Id deduplication, oversized messages, cleanup,
and a real server restart in the middle of a 10,000-message run.
"""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import time
from collections.abc import AsyncIterator

import anyio
import nats
import pytest

from herald import App
from herald.message import Message, new_id
from herald.testing.conformance import unique_name
from herald.testing.servers import reachable, require_server
from herald.transports import TransportError, open_transport
from herald.transports.nats import NatsTransport, PayloadTooLarge
from herald.transports.nats.options import parse_url
from herald.transports.nats.wire import (
    decode_message,
    delivery_info,
    encode_headers,
    stream_name,
    subject_for,
)

from .conftest import topic, wait_until

pytestmark = pytest.mark.anyio

URL = "nats://127.0.0.1:4222"
NATS_BIN = "/usr/sbin/nats-server"
START = [
    "start-stop-daemon", "--start", "--oknodo", "--background", "--exec", NATS_BIN, "--",
    "-a", "127.0.0.1", "-p", "4222", "-js", "-sd", "/var/lib/nats-server",
    "-l", "/var/log/nats-server.log",
]  # fmt: skip


@pytest.fixture
async def transport() -> AsyncIterator[NatsTransport]:
    require_server("nats")
    t = open_transport(URL)
    assert isinstance(t, NatsTransport)
    async with t:
        yield t


async def stream_names(t: NatsTransport) -> list[str]:
    return await t._stream_names(t._require())


# --- URL, options, secrets -------------------------------------------------------------------


def test_url_options_parse() -> None:
    o = parse_url(
        "tls://alice:p%40ss@nats.example:4443?ack_wait=2.5&max_age=3600&max_bytes=1000"
        "&storage=memory&retention=limits&creds=/x.creds&name=svc"
    )
    assert (o.host, o.port, o.tls, o.user, o.password) == (
        "nats.example",
        4443,
        True,
        "alice",
        "p@ss",
    )
    assert (o.ack_wait, o.max_age, o.max_bytes, o.storage, o.creds) == (
        2.5, 3600.0, 1000, "memory", "/x.creds",
    )  # fmt: skip
    assert parse_url("nats://127.0.0.1").port == 4222
    token = parse_url("nats://s3cret@127.0.0.1:4222")
    assert token.token == "s3cret" and token.user is None
    assert "s3cret" not in token.safe_url() and "s3cret" not in repr(token)


@pytest.mark.parametrize(
    "url",
    [
        "nats://127.0.0.1:4222?ack_wait=0",
        "nats://127.0.0.1:4222?ack_wait=soon",
        "nats://127.0.0.1:4222?max_age=-1",
        "nats://127.0.0.1:4222?retention=workqueue",
        "nats://127.0.0.1:4222?storage=disk",
        "nats://127.0.0.1:4222?bogus=1",
        "nats://127.0.0.1:4222?ack_wait=1&ack_wait=2",
        "nats://127.0.0.1:notaport",
        "nats://127.0.0.1:4222/path",
        "nats://a:4222,b:4222",
        "nats://",
        "http://127.0.0.1:4222",
    ],
)
def test_bad_urls_raise_value_error(url: str) -> None:
    with pytest.raises(ValueError):
        NatsTransport.from_url(url)


def test_url_property_hides_password_and_token() -> None:
    assert open_transport("nats://bob:s3cret@h:1").url == "nats://bob:***@h:1"
    assert open_transport("nats://s3cret@h:1").url == "nats://***@h:1"
    assert open_transport("tls://h").url == "tls://h:4222"


async def test_unreachable_server_raises_transport_error_without_secrets(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Connecting to a closed port fails with TransportError once ``connect_timeout`` is
    spent (here 1 s), never showing the password, in the error or logs."""
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"nats://alice:s3cret@127.0.0.1:{port}?connect_timeout=1"
    caplog.set_level(logging.DEBUG)
    t = open_transport(url)
    started = time.monotonic()
    with pytest.raises(TransportError) as err:
        await t.connect()
    took = time.monotonic() - started
    assert took < 10, f"gave up only after {took:.1f}s"
    assert "s3cret" not in str(err.value) and "***" in str(err.value)
    assert "within 1s" in str(err.value)
    assert "s3cret" not in caplog.text
    with pytest.raises(TransportError, match="not connected"):
        await t.publish("x", [])
    await t.close()


async def test_tls_url_against_plain_server_is_refused() -> None:
    """``tls://`` to a server without TLS fails with TransportError before any credentials
    are sent (nats-py alone would fall back to plain TCP)."""
    require_server("nats")
    t = open_transport("tls://u:s3cret@127.0.0.1:4222?connect_timeout=1")
    with pytest.raises(TransportError, match="does not offer TLS") as err:
        await t.connect()
    assert "s3cret" not in str(err.value)
    await t.close()


# --- wire format ------------------------------------------------------------------------------


def test_names_map_one_to_one() -> None:
    assert stream_name("orders.created") == "orders~created"
    assert subject_for("orders.created") == "orders.created"
    assert subject_for("a..b") == "a~~b" and subject_for("a.") == "a~"
    assert stream_name("a_.b") != stream_name("a._b")


def test_wire_round_trip_and_plain_messages() -> None:
    m = Message(
        id=new_id(),
        topic="t",
        payload=b"x",
        key="ключ",
        type="T",
        headers={
            "correlation_id": "c",
            "multi\nline": "v",
            "tb": "Traceback\n  line",
            "Nats-Expected-Stream": "evil",
            " pad": " spaced ",
            "empty": "",
        },
    )
    h = encode_headers(m)
    assert h["Nats-Msg-Id"] == m.id and h["Herald-Type"] == "T" and h["correlation_id"] == "c"
    assert "Nats-Expected-Stream" not in h  # would mean something to the server
    assert all("\n" not in v for v in h.values())
    assert decode_message("t", b"x", dict(h), 7) == m
    plain = decode_message("t", b"raw", None, 42)
    assert plain.id == "nats:t:42" and plain.key is None and plain.headers == {}
    assert delivery_info("$JS.ACK.s.c.3.10.9.1700000000000000000.0") == (3, 10)
    assert delivery_info("$JS.ACK.dom.acchash.s.c.2.11.9.1700000000000000000.0.tok") == (2, 11)


# --- against the server -----------------------------------------------------------------------


async def test_features_from_server(transport: NatsTransport) -> None:
    f = transport.features
    assert f.persistent and f.cross_process and f.native_delay and f.replay and f.headers
    assert f.max_payload == 1024 * 1024 - 16 * 1024  # the server's default max_payload


async def test_plain_nats_py_publish_is_consumed(transport: NatsTransport) -> None:
    t = topic()
    sub = await transport.subscribe(t, "g")  # creates the stream
    nc = await nats.connect(URL)
    try:
        js = nc.jetstream()
        ack = await js.publish(t, b'{"plain": true}')
        await js.publish(t, b"with headers", headers={"source": "script", "Herald-Type": "X"})
    finally:
        await nc.close()
    got = []
    with anyio.fail_after(10):
        while len(got) < 2:
            got += await sub.fetch(10, 0.5)
    await sub.ack(got)
    first, second = (d.message for d in got)
    assert first.payload == b'{"plain": true}' and first.id == f"nats:{t}:{ack.seq}"
    assert first.type is None and first.key is None and first.headers == {}
    assert second.type == "X" and second.headers == {"source": "script"}
    assert got[0].attempt == 1
    await sub.close()


async def test_herald_message_read_by_plain_nats_py(transport: NatsTransport) -> None:
    t = topic()
    m = Message(
        id=new_id(),
        topic=t,
        key="order-1",
        type="OrderPlaced",
        payload=b'{"order": 1}',
        headers={"correlation_id": "c-1", "naïve": "ü"},
    )
    await transport.publish(t, [m])
    nc = await nats.connect(URL)
    try:
        js = nc.jetstream()
        psub = await js.pull_subscribe(t, durable="plain", stream=stream_name(t))
        [msg] = await psub.fetch(1, timeout=5)
        await msg.ack()
    finally:
        await nc.close()
    assert msg.data == m.payload
    h = msg.headers or {}
    assert h["Nats-Msg-Id"] == m.id
    assert (h["Herald-Key"], h["Herald-Type"], h["correlation_id"]) == (
        "order-1", "OrderPlaced", "c-1",
    )  # fmt: skip
    assert json.loads(h["Herald-Headers"]) == {"naïve": "ü"}


async def test_same_message_id_is_stored_once(transport: NatsTransport) -> None:
    t = topic()
    m = Message(id=new_id(), topic=t, payload=b"once")
    await transport.publish(t, [m])
    await transport.publish(t, [m, m])
    async with transport_sub(transport, t) as sub:
        got = await sub.fetch(10, 1.0)
        assert [d.message.id for d in got] == [m.id]
        await sub.ack(got)
        assert await sub.fetch(10, 0.3) == []


class transport_sub:
    def __init__(self, t: NatsTransport, topic: str, group: str = "g") -> None:
        self.t, self.topic, self.group = t, topic, group

    async def __aenter__(self):  # type: ignore[no-untyped-def]
        self.sub = await self.t.subscribe(self.topic, self.group)
        return self.sub

    async def __aexit__(self, *exc: object) -> None:
        await self.sub.close()


async def test_oversized_message_is_refused_before_sending(transport: NatsTransport) -> None:
    t = topic()
    big = Message(id=new_id(), topic=t, payload=b"x" * (1024 * 1024))
    with pytest.raises(PayloadTooLarge, match="max_payload"):
        await transport.publish(t, [big])
    with pytest.raises(ValueError):  # it is also a ValueError: bad input
        await transport.publish(t, [big])
    ok = Message(id=new_id(), topic=t, payload=b"x" * transport.features.max_payload)  # type: ignore[operator]
    await transport.publish(t, [ok])  # the connection survived and the limit is usable


async def test_delete_topic_leaves_no_streams_or_consumers(transport: NatsTransport) -> None:
    t = unique_name("del")
    await transport.publish(t, [Message(id=new_id(), topic=t, payload=b"x")])
    sub = await transport.subscribe(t, "g.one")
    await sub.close()
    for side in (f"{t}.g.one.dlq", f"{t}.g.one.skipped"):
        await transport.publish(side, [Message(id=new_id(), topic=side, payload=b"x")])
    assert len([n for n in await stream_names(transport) if n.startswith(stream_name(t))]) == 3
    await transport.delete_topic(t)
    assert [n for n in await stream_names(transport) if n.startswith(stream_name(t))] == []
    await transport.delete_topic(t)  # missing: not an error
    # and the topic works again from scratch afterwards
    await transport.publish(t, [Message(id=new_id(), topic=t, payload=b"y")])
    await transport.delete_topic(t)


async def test_odd_topic_names_map_to_valid_subjects(transport: NatsTransport) -> None:
    for t in (unique_name("a") + "..b", unique_name("end") + "."):
        m = Message(id=new_id(), topic=t, payload=b"odd")
        await transport.publish(t, [m])
        async with transport_sub(transport, t) as sub:
            got = await sub.fetch(5, 2.0)
            assert [d.message for d in got] == [m]
            await sub.ack(got)
        await transport.delete_topic(t)


# --- server restart -------------------------------------------------------------------------


def _stop_server() -> None:
    subprocess.run(
        ["start-stop-daemon", "--stop", "--exec", NATS_BIN, "--retry", "15"],
        check=False,
        capture_output=True,
    )


def _start_server() -> None:
    subprocess.run(START, check=False, capture_output=True)
    deadline = time.monotonic() + 30
    while not reachable("127.0.0.1", 4222) and time.monotonic() < deadline:
        time.sleep(0.1)


@pytest.mark.slow
async def test_server_restart_mid_run_loses_nothing(caplog: pytest.LogCaptureFixture) -> None:
    """10,000 messages are published in batches while an App consumes them; the NATS server
    is stopped and started again half-way. Every message is handled (duplicates allowed:
    at-least-once), publishers and consumers resume on their own, and the loss and the
    reconnect are logged."""
    require_server("nats")
    caplog.set_level(logging.WARNING, logger="herald.transports.nats")
    t = topic()
    total, batch = 10_000, 100
    app = App("restart", broker=URL)
    seen: set[int] = set()

    @app.subscriber(t, group="g")
    async def handle(body: bytes) -> None:
        seen.add(int(body))

    restarted = False
    published = 0

    async def publisher() -> None:
        nonlocal published
        for start in range(0, total, batch):
            await app.publish_many(t, [str(i).encode() for i in range(start, start + batch)])
            published += batch
            await anyio.sleep(0.01)  # stretch the run so the restart lands in the middle

    async def restarter() -> None:
        nonlocal restarted
        await wait_until(lambda: len(seen) >= total // 3, timeout=60)
        await anyio.to_thread.run_sync(_stop_server)
        await anyio.sleep(1.0)  # publishes, fetches and acks meet a dead server
        await anyio.to_thread.run_sync(_start_server)
        restarted = True

    try:
        with anyio.fail_after(180):
            async with app:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(publisher)
                    tg.start_soon(restarter)
                await wait_until(lambda: len(seen) == total, timeout=120)
    finally:
        if not reachable("127.0.0.1", 4222):
            _start_server()
    assert published == total
    assert restarted
    assert seen == set(range(total))
    assert "connection lost" in caplog.text and "reconnected" in caplog.text
