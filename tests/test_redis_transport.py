"""Redis-specific behaviour of the ``redis://`` transport (the shared contract is in
``test_conformance_redis.py``): URL options, password redaction, an unreachable server, the wire
format both ways with plain clients, a server restart, retention, TLS, and clean deletion.

Tests that need to stop a server or change its configuration run their own ``redis-server`` on
a free loopback port; the rest use the shared server of ../shared/services.md.
"""

from __future__ import annotations

import json
import logging
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import msgspec
import pytest
import redis.asyncio as aioredis

from herald import App
from herald.message import Message, new_id
from herald.testing.conformance import drain, make_messages
from herald.testing.servers import in_ci, require_server
from herald.transports import TransportError, open_transport
from herald.transports.redis import RedisTransport
from herald.transports.redis.options import parse_url as _parse_url

from .conftest import free_port, self_signed

pytestmark = pytest.mark.anyio

SHARED = "redis://127.0.0.1:6379/0"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def shared() -> str:
    require_server("redis")
    return SHARED


@pytest.fixture
async def raw(shared: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis(host="127.0.0.1", port=6379, db=0, protocol=2)
    yield client
    await client.aclose()


@pytest.fixture
async def transport(shared: str) -> AsyncIterator[RedisTransport]:
    t = open_transport(shared)
    assert isinstance(t, RedisTransport)
    await t.connect()
    yield t
    await t.close()


@pytest.fixture
def topic(raw: aioredis.Redis) -> Iterator[str]:
    """A fresh topic; every key mentioning it is removed afterwards."""
    name = f"rt.{uuid.uuid4().hex[:16]}"
    yield name

    async def cleanup() -> None:
        client = aioredis.Redis(host="127.0.0.1", port=6379, db=0)
        keys = [k async for k in client.scan_iter(match=f"*{name}*", count=1000)]
        if keys:
            await client.unlink(*keys)
        await client.aclose()

    anyio.run(cleanup)


# --- a private redis-server ----------------------------------------------------------------


class PrivateRedis:
    """A ``redis-server`` this test started (stopped by its own pid or SHUTDOWN NOSAVE)."""

    def __init__(self, tmp: Path, *extra: str, port: int | None = None) -> None:
        self.port = port or free_port()
        self.tmp = tmp
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *, listen: str = "port") -> None:
        ports = (
            ["--port", str(self.port)]
            if listen == "port"
            else ["--port", "0", "--tls-port", str(self.port)]
        )
        self.proc = subprocess.Popen(
            ["redis-server", *ports, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.tmp), *self.extra],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError(f"private redis-server on {self.port} did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        self.proc = None

    def shutdown_nosave(self) -> None:
        """What services.md says for a restart: SHUTDOWN NOSAVE (the data is gone)."""
        subprocess.run(
            ["redis-cli", "-p", str(self.port), "shutdown", "nosave"],
            capture_output=True,
            timeout=10,
        )
        assert self.proc is not None
        self.proc.wait(timeout=10)
        self.proc = None


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    if shutil.which("redis-server") is None:
        message = "redis-server is not installed (apt-get install redis-server)"
        if in_ci():
            pytest.fail(message)
        pytest.skip(message)
    server = PrivateRedis(tmp_path)
    server.start()
    yield server
    server.stop()


# --- URL -----------------------------------------------------------------------------------


def test_url_defaults_and_options() -> None:
    o = _parse_url("redis://127.0.0.1:6380/3")
    assert (o.host, o.port, o.db, o.tls) == ("127.0.0.1", 6380, 3, False)
    assert o.visibility_timeout == 30.0 and o.retention == "keep" and o.maxlen is None
    o = _parse_url("redis://localhost")
    assert (o.port, o.db) == (6379, 0)
    o = _parse_url(
        "rediss://al%40ice:p%3Ass%2Fw@redis.example:6390/1?visibility_timeout=2.5"
        "&claim_interval=0.1&retention=acked&maxlen=1000&ssl_cert_reqs=none"
        "&ssl_check_hostname=false&reconnect_timeout=0"
    )
    assert o.tls and o.username == "al@ice" and o.password == "p:ss/w"
    assert o.visibility_timeout == 2.5 and o.claim_interval == 0.1 and o.retention == "acked"
    assert o.maxlen == 1000 and o.reconnect_timeout == 0.0
    assert o.ssl == {"ssl_cert_reqs": "none", "ssl_check_hostname": False}
    assert _parse_url("redis://h/0?max_age=3600").max_age == 3600.0


@pytest.mark.parametrize(
    ("url", "complaint"),
    [
        ("redis://h/0?bogus=1", "unknown redis URL option 'bogus'"),
        ("redis://h/0?maxlen=0", "maxlen"),
        ("redis://h/0?maxlen=ten", "maxlen"),
        ("redis://h/0?visibility_timeout=0", "visibility_timeout"),
        ("redis://h/0?visibility_timeout=nan", "visibility_timeout"),
        ("redis://h/0?claim_interval=-1", "claim_interval"),
        ("redis://h/0?retention=forever", "retention"),
        ("redis://h/0?maxlen=5&max_age=5", "exclude each other"),
        ("redis://h/0?maxlen=5&maxlen=6", "given twice"),
        ("redis://h/0?ssl_cert_reqs=none", "rediss://"),
        ("redis://h/db", "database number"),
        ("redis://h:notaport/0", "malformed"),
    ],
)
def test_bad_urls_say_what_is_wrong(url: str, complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint):
        open_transport(url)
    with pytest.raises(ValueError, match="not a redis URL"):
        RedisTransport.from_url("http://h/0")


def test_password_is_redacted_everywhere() -> None:
    t = open_transport("redis://user:s3cr3t-pw@127.0.0.1:6379/0?visibility_timeout=5")
    assert "s3cr3t-pw" not in t.url and "***" in t.url
    assert "s3cr3t-pw" not in repr(t)
    with pytest.raises(ValueError) as e:
        open_transport("redis://user:s3cr3t-pw@127.0.0.1:6379/0?nope=1")
    assert "s3cr3t-pw" not in str(e.value)


# --- connecting ----------------------------------------------------------------------------


async def test_unreachable_server_fails_fast_without_password() -> None:
    port = free_port()  # nothing listens there
    t = open_transport(f"redis://u:hunter2-secret@127.0.0.1:{port}/0?connect_timeout=1")
    started = time.monotonic()
    with pytest.raises(TransportError) as e:
        await t.connect()
    assert time.monotonic() - started < 5
    text = str(e.value)
    assert f"127.0.0.1:{port}" in text and "hunter2-secret" not in text and "***" in text
    await t.close()


async def test_wrong_password_is_refused_and_redacted(tmp_path: Path) -> None:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    server = PrivateRedis(tmp_path, "--requirepass", "right-pass-123")
    server.start()
    try:
        bad = open_transport(f"redis://:wrong-pass-456@127.0.0.1:{server.port}/0")
        with pytest.raises(TransportError) as e:
            await bad.connect()
        assert "wrong-pass-456" not in str(e.value) and "right-pass-123" not in str(e.value)
        await bad.close()
        async with open_transport(f"redis://:right-pass-123@127.0.0.1:{server.port}/2") as good:
            [m] = make_messages("auth.t", 1)
            await good.publish("auth.t", [m])
            sub = await good.subscribe("auth.t", "g")
            seen = await drain(sub, [m.id], timeout=5)
            assert m.id in seen
            await sub.close()
    finally:
        server.stop()


async def test_warns_when_the_server_keeps_nothing_on_disk(
    private_redis: PrivateRedis, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="herald.transports.redis"):
        async with open_transport(f"redis://127.0.0.1:{private_redis.port}/0"):
            pass
    assert any("keeps nothing on disk" in r.getMessage() for r in caplog.records)


# --- the wire format, both ways ------------------------------------------------------------


async def test_redis_cli_entry_is_consumable(transport: RedisTransport, topic: str) -> None:
    """``redis-cli XADD <stream> * payload '{"a":1}'``: minimal fields are enough."""
    if shutil.which("redis-cli") is None:
        pytest.skip("redis-cli is not installed")
    out = subprocess.run(
        ["redis-cli", "-p", "6379", "XADD", topic, "*", "payload", '{"a":1}'],
        capture_output=True, text=True, check=True, timeout=10,
    )  # fmt: skip
    entry_id = out.stdout.strip()
    sub = await transport.subscribe(topic, "g")
    try:
        [d] = await sub.fetch(10, 5)
        assert d.message.payload == b'{"a":1}'
        assert d.message.id == entry_id  # no id field: the entry id, stable on redelivery
        assert (d.message.key, d.message.type, d.message.headers) == (None, None, {})
        assert d.attempt == 1
        await sub.ack([d])
    finally:
        await sub.close()


async def test_plain_client_entries_are_read_liberally(
    transport: RedisTransport, raw: aioredis.Redis, topic: str
) -> None:
    """Unknown fields become headers; without ``payload`` the fields are the payload (JSON);
    ``headers`` JSON, ``key``, ``type`` and ``id`` are taken as written."""
    await raw.xadd(topic, {"payload": b"\x00\xff", "source": "billing", "type": "Paid"})
    await raw.xadd(topic, {"order_id": "7", "amount": "12.50"})
    await raw.xadd(
        topic,
        {"id": "my-id-1", "key": "k1", "payload": "x", "headers": json.dumps({"a": "b"})},
    )
    await raw.xadd(topic, {"payload": "y", "headers": "not json"})
    sub = await transport.subscribe(topic, "g")
    try:
        got = []
        with anyio.fail_after(5):
            while len(got) < 4:
                got += await sub.fetch(10, 1)
        a, b, c, d = (x.message for x in got)
        assert a.payload == b"\x00\xff" and a.type == "Paid" and a.headers == {"source": "billing"}
        assert json.loads(b.payload) == {"order_id": "7", "amount": "12.50"} and b.headers == {}
        assert (c.id, c.key, c.payload, c.headers) == ("my-id-1", "k1", b"x", {"a": "b"})
        assert d.headers == {"invalid_headers": "not json"}
        await sub.ack(got)
    finally:
        await sub.close()


async def test_herald_message_readable_with_xrange(
    transport: RedisTransport, raw: aioredis.Redis, topic: str
) -> None:
    m = Message(
        id=new_id(),
        topic=topic,
        key="order-1",
        type="OrderPlaced",
        payload=b'{"order": 1}',
        headers={"correlation_id": "c-1", "ünï": "✓"},
    )
    bare = Message(id=new_id(), topic=topic, payload=b"bare")
    await transport.publish(topic, [m, bare])
    (_, fields), (_, bare_fields) = await raw.xrange(topic)
    assert fields == {
        b"id": m.id.encode(),
        b"payload": b'{"order": 1}',
        b"key": b"order-1",
        b"type": b"OrderPlaced",
        b"headers": msgspec.json.encode(m.headers),
    }
    assert json.loads(fields[b"headers"]) == m.headers
    assert bare_fields == {b"id": bare.id.encode(), b"payload": b"bare"}


async def test_app_handles_plain_xadd_end_to_end(raw: aioredis.Redis, topic: str) -> None:
    got: list[dict[str, int]] = []
    app = App("interop", broker=SHARED)

    @app.subscriber(topic, group="svc")
    async def handle(event: dict[str, int]) -> None:
        got.append(event)

    async with app:
        await raw.xadd(topic, {"payload": '{"a":1}'})
        with anyio.fail_after(10):
            while not got:
                await anyio.sleep(0.01)
    assert got == [{"a": 1}]
    pending = await raw.xpending(topic, "svc")
    assert pending["pending"] == 0


# --- groups, consumers, nacks --------------------------------------------------------------


async def test_consumers_are_unique_and_removed_on_close(
    transport: RedisTransport, raw: aioredis.Redis, topic: str
) -> None:
    a = await transport.subscribe(topic, "g")
    b = await transport.subscribe(topic, "g")
    assert a.consumer != b.consumer
    assert a.consumer.count("-") >= 2  # host-pid-random
    await transport.publish(topic, make_messages(topic, 4))
    held = await a.fetch(2, 5)
    assert len(held) == 2
    await a.close()  # releases both at once
    pending = await raw.xpending_range(topic, "g", "-", "+", 10)
    assert {p["consumer"] for p in pending} == {b"herald:released"}
    seen = await drain(b, [d.message.id for d in held], timeout=5)
    assert all(v[0].attempt == 2 for k, v in seen.items() if k in {d.message.id for d in held})
    await b.close()
    names = {c["name"] for c in await raw.xinfo_consumers(topic, "g")}
    assert a.consumer.encode() not in names and b.consumer.encode() not in names


async def test_delayed_nack_state_lives_in_redis(
    transport: RedisTransport, raw: aioredis.Redis, topic: str
) -> None:
    [m] = make_messages(topic, 1)
    await transport.publish(topic, [m])
    sub = await transport.subscribe(topic, "g")
    [d] = await sub.fetch(1, 5)
    await sub.nack(d, delay=30)
    delayed = f"herald:{{{topic}}}:delayed:g"
    assert await raw.zcard(delayed) == 1
    assert (await raw.xpending(topic, "g"))["pending"] == 0  # acked, the copy waits
    (_member, due), *_ = await raw.zrange(delayed, 0, 0, withscores=True)
    assert due / 1000 > time.time() + 25
    await sub.close()


# --- retention -----------------------------------------------------------------------------


async def test_default_keeps_everything(
    transport: RedisTransport, raw: aioredis.Redis, topic: str
) -> None:
    published = make_messages(topic, 300)
    await transport.publish(topic, published)
    sub = await transport.subscribe(topic, "g")
    await drain(sub, [m.id for m in published], timeout=10)
    await sub.close()
    assert await raw.xlen(topic) == 300


async def test_maxlen_caps_the_stream(raw: aioredis.Redis, topic: str, shared: str) -> None:
    async with open_transport(f"{shared}?maxlen=100") as t:
        for _ in range(10):
            await t.publish(topic, make_messages(topic, 100))
    n = await raw.xlen(topic)
    assert 100 <= n < 1000  # "~": whole macro nodes are trimmed


async def test_max_age_trims_old_entries(raw: aioredis.Redis, topic: str, shared: str) -> None:
    await raw.xadd(topic, {"payload": "old"}, id=f"{int(time.time() * 1000) - 3_600_000}-0")
    async with open_transport(f"{shared}?max_age=60") as t:
        await t.publish(topic, make_messages(topic, 1))
    # "~" trims whole nodes only, so force the check on an exact trim of what MINID allows
    assert await raw.xlen(topic) in (1, 2)
    entries = await raw.xrange(topic)
    assert entries[-1][1][b"payload"].startswith(b"m-")


async def test_acked_retention_never_drops_unacked(
    raw: aioredis.Redis, topic: str, shared: str
) -> None:
    """With ``retention=acked`` the stream is trimmed below what every group has acked; a
    lagging group keeps everything it has not acked, pending deliveries included."""
    url = f"{shared}?retention=acked&claim_interval=0.05"
    async with open_transport(url) as t:
        fast = await t.subscribe(topic, "fast")
        slow = await t.subscribe(topic, "slow")
        published = make_messages(topic, 1000)
        await t.publish(topic, published)
        await drain(fast, [m.id for m in published], timeout=10)
        held = await slow.fetch(10, 5)  # pending in slow, not acked
        await anyio.sleep(1.2)
        await fast.fetch(1, 0.2)  # maintenance runs the trim
        assert await raw.xlen(topic) == 1000  # slow still needs every entry
        await slow.ack(held[1:])  # the first one stays pending
        rest = [m.id for m in published[10:]]
        await drain(slow, rest, timeout=10)
        await anyio.sleep(1.2)
        await slow.fetch(1, 0.3)
        remaining = await raw.xrange(topic)
        assert remaining[0][1][b"id"].decode() <= held[0].message.id  # the pending one is kept
        assert held[0].message.id in {f[b"id"].decode() for _, f in remaining}
        await slow.ack(held[:1])
        await anyio.sleep(1.2)
        await slow.fetch(1, 0.3)
        assert await raw.xlen(topic) < 1000  # now it could trim
        await fast.close()
        await slow.close()


# --- deleting ------------------------------------------------------------------------------


async def test_delete_topic_leaves_no_keys(raw: aioredis.Redis, topic: str, shared: str) -> None:
    async with open_transport(shared) as t:
        for group in ("a", "b"):
            await t.subscribe(topic, group)
        await t.publish(topic, make_messages(topic, 3))
        sub = await t.subscribe(topic, "a")
        [d, *_] = await sub.fetch(3, 5)
        await sub.nack(d, delay=60)  # a delayed set
        await sub.close()
        await t.publish(f"{topic}.a.dlq", make_messages(f"{topic}.a.dlq", 1))
        dlq = await t.subscribe(f"{topic}.a.dlq", "herald.dlq")
        await dlq.close()
        await t.publish(f"{topic}.b.skipped", make_messages(f"{topic}.b.skipped", 1))
        other = f"{topic}x"  # a neighbour that must survive
        await t.publish(other, make_messages(other, 1))
        assert len([k async for k in raw.scan_iter(match=f"*{topic}*")]) > 5
        await t.delete_topic(topic)
        left = sorted([k.decode() async for k in raw.scan_iter(match=f"*{topic}*")])
        assert left == [other]
        await t.delete_topic(topic)  # missing: not an error
        await t.delete_topic(other)
        assert [k async for k in raw.scan_iter(match=f"*{topic}*")] == []


async def test_topic_deleted_under_a_waiting_consumer(
    transport: RedisTransport, raw: aioredis.Redis, topic: str
) -> None:
    """Deleting a topic while a consumer blocks on it is no error and recreates nothing; when
    the topic is published to again, the group joins it again from the start."""
    sub = await transport.subscribe(topic, "g")
    async with anyio.create_task_group() as tg:
        tg.start_soon(sub.fetch, 10, 1.5)  # blocked in XREADGROUP while the stream goes
        await anyio.sleep(0.3)
        await transport.delete_topic(topic)
    assert await sub.fetch(10, 0.3) == []
    assert [k async for k in raw.scan_iter(match=f"*{topic}*")] == []
    again = make_messages(topic, 2)
    await transport.publish(topic, again)
    seen = await drain(sub, [m.id for m in again], timeout=10)
    assert set(seen) == {m.id for m in again}
    await sub.close()


async def test_non_stream_key_is_refused(
    transport: RedisTransport, raw: aioredis.Redis, topic: str
) -> None:
    await raw.set(topic, "a string")
    with pytest.raises(TransportError, match=r"WRONGTYPE|not a Herald topic"):
        await transport.publish(topic, make_messages(topic, 1))
    with pytest.raises(TransportError, match="not a Herald topic"):
        await transport.delete_topic(topic)
    assert await raw.get(topic) == b"a string"


# --- a server restart ----------------------------------------------------------------------


async def test_survives_a_server_restart(private_redis: PrivateRedis) -> None:
    """Publish and consume, SHUTDOWN NOSAVE, start again: the same transport and subscription
    carry on (the group is created again), and a publish made while the server is down
    completes once it is back."""
    url = f"redis://127.0.0.1:{private_redis.port}/0?reconnect_timeout=20"
    async with open_transport(url) as t:
        sub = await t.subscribe("orders", "svc")
        before = make_messages("orders", 5)
        await t.publish("orders", before)
        await drain(sub, [m.id for m in before], timeout=5)

        private_redis.shutdown_nosave()
        during = make_messages("orders", 3)

        async def restart_later() -> None:
            await anyio.sleep(1.0)
            await anyio.to_thread.run_sync(private_redis.start)

        async with anyio.create_task_group() as tg:
            tg.start_soon(restart_later)
            await t.publish("orders", during)  # waits for the server
        after = make_messages("orders", 3)
        await t.publish("orders", after)
        seen = await drain(sub, [m.id for m in during + after], timeout=15)
        assert {m.id for m in during + after} <= seen.keys()
        await sub.close()


async def test_outage_longer_than_reconnect_timeout_raises(private_redis: PrivateRedis) -> None:
    url = f"redis://127.0.0.1:{private_redis.port}/0?reconnect_timeout=0.5&connect_timeout=0.5"
    async with open_transport(url) as t:
        private_redis.shutdown_nosave()
        started = time.monotonic()
        with pytest.raises(TransportError, match="unreachable"):
            await t.publish("orders", make_messages("orders", 1))
        assert time.monotonic() - started < 5


# --- TLS -----------------------------------------------------------------------------------


async def test_tls_with_credentials(tmp_path: Path) -> None:
    if shutil.which("redis-server") is None or shutil.which("openssl") is None:
        message = "needs redis-server (built with TLS) and openssl"
        if in_ci():
            pytest.fail(message)
        pytest.skip(message)
    cert, key = self_signed(tmp_path)
    server = PrivateRedis(
        tmp_path,
        "--tls-cert-file", str(cert), "--tls-key-file", str(key),
        "--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no",
        "--user", "app", "on", ">tls-pass-789", "~*", "&*", "+@all",
    )  # fmt: skip
    server.start(listen="tls")
    try:
        url = f"rediss://app:tls-pass-789@127.0.0.1:{server.port}/0?ssl_ca_certs={cert}"
        async with open_transport(url) as t:
            assert "tls-pass-789" not in t.url
            published = make_messages("secure", 3)
            await t.publish("secure", published)
            sub = await t.subscribe("secure", "g")
            seen = await drain(sub, [m.id for m in published], timeout=5)
            assert set(seen) == {m.id for m in published}
            await sub.close()
        plain = open_transport(
            f"redis://app:tls-pass-789@127.0.0.1:{server.port}/0?connect_timeout=1"
        )
        with pytest.raises(TransportError) as e:  # a plain connection to a TLS port fails
            await plain.connect()
        assert "tls-pass-789" not in str(e.value)
        await plain.close()
    finally:
        server.stop()
