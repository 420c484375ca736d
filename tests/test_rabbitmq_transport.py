"""RabbitMQ-specific behaviour: URL options, redaction, unreachable server, interop with a plain
aio-pika client both ways, routing-key bindings, broker restart recovery, delete_topic."""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from collections.abc import AsyncIterator

import aio_pika
import aiormq
import anyio
import pytest

from herald.message import Message, new_id
from herald.testing.conformance import drain, make_messages, unique_name
from herald.testing.servers import require_server
from herald.transports import TransportError, open_transport
from herald.transports.rabbitmq import subscription as rmq_sub
from herald.transports.rabbitmq import transport as rmq
from herald.transports.rabbitmq.options import parse_url
from herald.transports.rabbitmq.registry import registry_queue
from herald.transports.rabbitmq.wire import delay_bucket, delay_queue, group_queue, parked_name

from .worker import checkout_env

pytestmark = pytest.mark.anyio
URL = "amqp://guest:guest@127.0.0.1:5672/"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def transport() -> AsyncIterator[rmq.RabbitMQTransport]:
    require_server("rabbitmq")
    t = open_transport(URL)
    assert isinstance(t, rmq.RabbitMQTransport)
    await t.connect()
    created = set(rmq._created_groups)
    try:
        yield t
    finally:
        for name in sorted(set(rmq._created_groups) - created, key=len, reverse=True):
            if name in rmq._created_groups:
                await t.delete_topic(name)
        await t.close()


def _rabbitmqctl(*args: str) -> str:
    return subprocess.run(
        ["rabbitmqctl", "-q", *args], capture_output=True, text=True, timeout=120, check=True
    ).stdout


# -- URL -----------------------------------------------------------------------------------


def test_url_options_parse() -> None:
    o = parse_url("amqps://u:p%40ss@host:5671/my%2Fvhost?bind=eu:order.eu.%23&connect_timeout=2")
    assert o.connect_timeout == 2.0
    assert o.bindings == {"eu": ["order.eu.#"]}
    assert o.redacted.startswith("amqps://u:***@host:5671/")
    assert "p%40ss" not in o.redacted


@pytest.mark.parametrize(
    "bad",
    [
        "http://x/",
        "amqp:///",
        "amqp://h/?bogus=1",
        "amqp://h/?connect_timeout=abc",
        "amqp://h/?bind=nocolon",
        "amqp://h:99999/",
        "amqp://h/a/b",
    ],
)
def test_bad_urls_raise_value_error(bad: str) -> None:
    with pytest.raises(ValueError):
        rmq.RabbitMQTransport.from_url(bad)


def test_amq_prefixed_topic_is_refused() -> None:
    with pytest.raises(ValueError, match="reserved"):
        rmq.RabbitMQTransport._check_topic("amq.orders")


async def test_unreachable_server_raises_redacted(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    t = open_transport("amqp://user:s3cret@127.0.0.1:1/?connect_timeout=1")
    started = time.monotonic()
    with pytest.raises(TransportError) as info:
        await t.connect()
    took = time.monotonic() - started
    assert took < 5, f"connect gave up after {took:.1f}s"
    assert "s3cret" not in str(info.value)
    assert "***" in str(info.value)
    assert "s3cret" not in caplog.text
    assert "s3cret" not in t.url


async def test_wrong_password_is_redacted(caplog: pytest.LogCaptureFixture) -> None:
    require_server("rabbitmq")
    caplog.set_level(logging.DEBUG)
    t = open_transport("amqp://guest:s3cret@127.0.0.1:5672/?connect_timeout=2")
    with pytest.raises(TransportError) as info:
        await t.connect()
    assert "s3cret" not in str(info.value)
    assert "s3cret" not in caplog.text


async def test_oversized_payload_is_refused(transport: rmq.RabbitMQTransport) -> None:
    topic = unique_name("big")
    too_big = Message(id=new_id(), topic=topic, payload=b"\0" * (rmq.MAX_PAYLOAD + 1))
    with pytest.raises(ValueError, match="max_message_size"):
        await transport.publish(topic, [too_big])


# -- interop -------------------------------------------------------------------------------


async def test_plain_client_to_herald_and_back(transport: rmq.RabbitMQTransport) -> None:
    topic, group = unique_name("interop"), unique_name("g")
    sub = await transport.subscribe(topic, group)
    conn = await aio_pika.connect(URL)
    try:
        channel = await conn.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(topic)
        await exchange.publish(
            aio_pika.Message(
                b'{"n": 1}',
                message_id="plain-1",
                type="OrderPlaced",
                content_type="application/json",
                headers={"source": "pika", "count": 3},
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            ),
            routing_key="order-7",
        )
        await exchange.publish(aio_pika.Message(b"bare"), routing_key="")
        got: list[Message] = []
        with anyio.fail_after(10):
            while len(got) < 2:
                batch = await sub.fetch(10, 0.5)
                await sub.ack(batch)
                got += [d.message for d in batch]
        first = next(m for m in got if m.id == "plain-1")
        assert first.key == "order-7"
        assert first.type == "OrderPlaced"
        assert first.payload == b'{"n": 1}'
        assert first.headers == {
            "source": "pika",
            "count": "3",
            "content_type": "application/json",
        }
        bare = next(m for m in got if m.payload == b"bare")
        assert bare.key is None and bare.type is None and bare.id

        # Herald -> plain consumer reading the group's queue
        m = Message(
            id=new_id(), topic=topic, key="k1", type="T", payload=b"xyz", headers={"a": "b"}
        )
        await transport.publish(topic, [m])
        await sub.close()
        queue = await channel.get_queue(group_queue(topic, group))
        with anyio.fail_after(10):
            incoming = None
            while incoming is None:
                incoming = await queue.get(fail=False)
                await anyio.sleep(0.05)
        await incoming.ack()
        assert incoming.message_id == m.id
        assert incoming.routing_key == "k1"
        assert incoming.type == "T"
        assert incoming.body == b"xyz"
        assert incoming.headers == {"a": "b"}
        assert incoming.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    finally:
        await conn.close()


# -- routing -------------------------------------------------------------------------------


async def test_bind_option_routes_by_key() -> None:
    require_server("rabbitmq")
    url = URL + "?bind=eu:order.eu.%23&bind=eu:refund.*"
    async with open_transport(url) as t:
        topic = unique_name("route")
        eu = await t.subscribe(topic, "eu")
        every = await t.subscribe(topic, "all")
        keys = ["order.eu.de", "order.us.ny", "refund.x", "refund.x.y", None]
        msgs = [Message(id=new_id(), topic=topic, key=k, payload=b"p") for k in keys]
        try:
            await t.publish(topic, msgs)
            seen = await drain(every, [m.id for m in msgs], timeout=10)
            assert len(seen) == 5
            want = {msgs[0].id, msgs[2].id}
            got = await drain(eu, want, timeout=10)
            assert set(got) == want
            assert await eu.fetch(10, 0.3) == []
        finally:
            await eu.close()
            await every.close()
            await t.delete_topic(topic)


# -- delete_topic --------------------------------------------------------------------------


async def test_delete_topic_leaves_nothing(transport: rmq.RabbitMQTransport) -> None:
    topic, group = unique_name("del"), unique_name("g")
    sub = await transport.subscribe(topic, group)
    await transport.publish(topic, make_messages(topic, 2))
    [d, *_] = await sub.fetch(1, 5)
    await sub.nack(d, delay=5)  # creates a delay queue
    await transport.publish(f"{topic}.{group}.dlq", make_messages(topic, 1))
    await sub.close()
    await transport.delete_topic(topic)
    queues = _rabbitmqctl("list_queues", "name")
    exchanges = _rabbitmqctl("list_exchanges", "name")
    assert topic not in queues
    assert topic not in exchanges
    await transport.delete_topic(topic)  # missing topic: no error


# -- broker restart ------------------------------------------------------------------------


@pytest.mark.slow
async def test_broker_restart_loses_nothing(caplog: pytest.LogCaptureFixture) -> None:
    """10,000 messages; the broker restarts while they are published and consumed; every
    message is handled at least once and the consumer resumes by itself."""
    require_server("rabbitmq")
    caplog.set_level(logging.INFO, logger="herald.transports.rabbitmq")
    n = 10_000
    async with open_transport(URL) as t:
        topic, group = unique_name("restart"), unique_name("g")
        sub = await t.subscribe(topic, group)
        published = make_messages(topic, n)
        want = {m.id for m in published}
        seen: set[str] = set()
        try:

            async def publisher() -> None:
                for i in range(0, n, 100):
                    await t.publish(topic, published[i : i + 100])
                    await anyio.sleep(0.005)

            async def consumer() -> None:
                while not want <= seen:
                    batch = await sub.fetch(256, 0.5)
                    seen.update(d.message.id for d in batch)
                    await sub.ack(batch)

            async def restart() -> None:
                await anyio.sleep(1.0)
                try:
                    await anyio.to_thread.run_sync(_rabbitmqctl, "stop_app")
                    await anyio.sleep(1.0)
                finally:
                    await anyio.to_thread.run_sync(_rabbitmqctl, "start_app")

            with anyio.fail_after(240):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(restart)
                    tg.start_soon(publisher)
                    tg.start_soon(consumer)
            assert want <= seen, f"{len(want - seen)} messages lost"
            assert "reconnected" in caplog.text
            assert "guest:guest" not in caplog.text
        finally:
            await sub.close()
            await t.delete_topic(topic)


# -- the consumer between fetches ----------------------------------------------------------


async def _consumers(channel: aio_pika.abc.AbstractChannel, queue: str) -> int:
    declared = await channel.declare_queue(queue, passive=True)
    result = declared.declaration_result
    return int(result.consumer_count or 0)


async def test_consumer_stays_open_while_fetching_and_pauses_between(
    transport: rmq.RabbitMQTransport,
) -> None:
    """The consumer outlives a fetch (no consume/cancel round trips per fetch) but is paused
    by an ack made while no fetch waits, and after IDLE_PAUSE without a fetch."""
    topic, group = unique_name("pause"), unique_name("g")
    sub = await transport.subscribe(topic, group)
    queue = group_queue(topic, group)
    conn = await aio_pika.connect(URL)
    try:
        channel = await conn.channel()
        await transport.publish(topic, make_messages(topic, 1))
        got = await sub.fetch(10, 5)
        assert len(got) == 1
        assert await _consumers(channel, queue) == 1  # still open after the fetch returned
        await sub.ack(got)  # no fetch waiting: paused before the ack goes out
        with anyio.fail_after(5):
            while await _consumers(channel, queue) != 0:
                await anyio.sleep(0.02)
        assert await sub.fetch(10, 0.1) == []  # opens it again, then times out
        assert await _consumers(channel, queue) == 1
        await anyio.sleep(rmq_sub.IDLE_PAUSE * 4)
        with anyio.fail_after(5):
            while await _consumers(channel, queue) != 0:
                await anyio.sleep(0.02)
    finally:
        await conn.close()
        await sub.close()


async def test_buffered_messages_keep_their_attempt(
    transport: rmq.RabbitMQTransport, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Messages pushed into the client buffer while the caller handles a batch are handed
    out in queue order by the next fetch at attempt 1, and given back at attempt 1 by
    close(); the handed-out, unacked delivery comes back at attempt 2."""
    monkeypatch.setattr(rmq_sub, "IDLE_PAUSE", 30.0)  # keep the consumer open meanwhile
    topic, group = unique_name("buffered"), unique_name("g")
    sub = await transport.subscribe(topic, group)
    assert isinstance(sub, rmq.RabbitMQSubscription)
    first, *rest = make_messages(topic, 6)
    await transport.publish(topic, [first])
    [d] = await sub.fetch(10, 5)
    assert d.message.id == first.id
    await transport.publish(topic, rest)  # pushed into the open consumer's buffer
    with anyio.fail_after(5):
        while len(sub._buffer) < len(rest):
            await anyio.sleep(0.01)
    [second] = await sub.fetch(1, 0)  # from the buffer, in order
    assert (second.message.id, second.attempt) == (rest[0].id, 1)
    await sub.ack([second])
    await sub.close()  # d handed out and unacked; rest[1:] buffered, never handed out
    other = await transport.subscribe(topic, group)
    try:
        want = [first.id] + [m.id for m in rest[1:]]
        seen = await drain(other, want, timeout=10)
        assert {mid: [x.attempt for x in ds] for mid, ds in seen.items()} == {
            first.id: [2],
            **{m.id: [1] for m in rest[1:]},
        }
    finally:
        await other.close()


CREATE_IN_ANOTHER_PROCESS = """
import sys, anyio
from herald.testing.helpers import make_messages
from herald.transports import open_transport

async def main(url, topic, group):
    async with open_transport(url) as t:
        sub = await t.subscribe(topic, group)
        await t.publish(topic, make_messages(topic, 1))
        [d] = await sub.fetch(1, 5)
        await sub.nack(d, delay=30)  # a delay queue, its copy still waiting in it
        await sub.close()
        dlq = await t.subscribe(f"{topic}.{group}.dlq", "herald.dlq")  # as a consumer does
        await dlq.close()

anyio.run(main, *sys.argv[1:])
"""


async def _exists(kind: str, name: str) -> bool:
    """A passive declare: True if the queue or exchange ``name`` exists."""
    connection = await aiormq.connect(URL)
    try:
        channel = await connection.channel()
        try:
            if kind == "queue":
                await channel.queue_declare(name, passive=True)
            else:
                await channel.exchange_declare(name, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            return False
        return True
    finally:
        await connection.close()


async def test_delete_topic_from_a_fresh_process_finds_everything() -> None:
    """Topic, group, a delay queue and a dead-letter topic made by another process are all
    deleted by a transport that never saw them (it learns them from the topic's registry)."""
    require_server("rabbitmq")
    topic, group = unique_name("fresh"), unique_name("g")
    made = subprocess.run(
        [sys.executable, "-c", CREATE_IN_ANOTHER_PROCESS, URL, topic, group],
        env=checkout_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert made.returncode == 0, made.stderr
    dlq = f"{topic}.{group}.dlq"
    objects = [
        ("exchange", topic),
        ("queue", group_queue(topic, group)),
        ("queue", delay_queue(group_queue(topic, group), delay_bucket(30))),
        ("queue", parked_name(topic)),
        ("exchange", dlq),
        ("queue", group_queue(dlq, "herald.dlq")),
    ]
    for kind, name in objects:
        assert await _exists(kind, name), f"{kind} {name} was not made"
    assert topic not in rmq._created_groups  # this process knows nothing of them
    async with open_transport(URL) as fresh:
        await fresh.delete_topic(topic)
    objects.append(("queue", registry_queue(topic)))
    left = [f"{kind} {name}" for kind, name in objects if await _exists(kind, name)]
    assert not left, f"left behind: {left}"
