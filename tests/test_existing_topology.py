"""Consuming what plain clients already produce, the way they produce it (issue 8).

Each engine's own client (aio-pika, redis-py, aiokafka, nats-py, aiomqtt, sqlite3) produces
messages with no Herald headers; a Herald App subscriber consumes them with typed decoding (a
pydantic model from a JSON payload that names no type). ``bind=`` and ``source=`` are checked
where the engine has them, and refused with a ValueError naming option and engine where not.
"""

from __future__ import annotations

import json
import sqlite3
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aio_pika
import aiomqtt
import anyio
import nats
import pydantic
import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaProducer

from herald import App, Context, Retry, dead_letter_topic
from herald.dlq import DeadLetters
from herald.testing.conformance import unique_name
from herald.testing.servers import require_server
from herald.transports import TransportError, open_transport
from herald.transports.base import check_topology

pytestmark = pytest.mark.anyio

RABBIT = "amqp://guest:guest@127.0.0.1:5672/"
REDIS = "redis://127.0.0.1:6379/0"
KAFKA = "kafka://127.0.0.1:9092"
NATS = "nats://127.0.0.1:4222"
MQTT = "mqtt://127.0.0.1:1883"
FAST = Retry(attempts=2, delay=0.001, deliveries=3, redelivery_delay=0.02, factor=1.0)


class UserRegistered(pydantic.BaseModel):
    user_id: str
    email: str


def user(i: int) -> bytes:
    return json.dumps({"user_id": f"u{i}", "email": f"u{i}@example.com"}).encode()


async def until(check: Callable[[], bool], timeout: float = 20) -> None:
    """Wait (bounded) until ``check()`` holds."""
    with anyio.fail_after(timeout):
        while not check():
            await anyio.sleep(0.02)


async def drop(url: str, topic: str) -> None:
    """Delete ``topic`` (and what hangs off it) with a transport of its own."""
    t = open_transport(url)
    async with t:
        await t.delete_topic(topic)


# --- RabbitMQ -----------------------------------------------------------------------------


@pytest.fixture
async def amqp() -> AsyncIterator[aio_pika.abc.AbstractChannel]:
    require_server("rabbitmq")
    conn = await aio_pika.connect(RABBIT)
    try:
        yield await conn.channel()
    finally:
        await conn.close()


@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
async def test_rabbitmq_source_queue_fed_through_the_default_exchange(
    amqp: aio_pika.abc.AbstractChannel, queue_type: str
) -> None:
    """The seed's producer: a queue filled through the default exchange
    (``routing_key=<queue>``). A group names it with ``source=`` and consumes it as it is
    (its type untouched), competing with a plain consumer of it; a failing handler is retried
    through Herald's delay queue back into that queue and dead-lettered; the replayed dead
    letter comes back to the group through the topic exchange."""
    queue_name = unique_name("user_registrations")
    app = App("welcome-svc", broker=RABBIT, retry=FAST)
    handled: list[tuple[str, str | None]] = []
    failures: Counter[str] = Counter()
    healed = anyio.Event()

    @app.subscriber(queue_name, group="welcome", source=queue_name)
    async def welcome(event: UserRegistered, ctx: Context) -> None:
        assert isinstance(event, UserRegistered)
        if event.user_id == "u0" and not healed.is_set():
            failures[event.user_id] += 1
            raise RuntimeError("mail server down")
        handled.append((event.user_id, ctx.message.type))

    plain: list[bytes] = []

    async def on_plain(msg: aio_pika.abc.AbstractIncomingMessage) -> None:
        async with msg.process():
            plain.append(msg.body)

    async def send(i: int) -> None:
        await amqp.default_exchange.publish(
            aio_pika.Message(user(i), delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
            routing_key=queue_name,
        )

    queue = await amqp.declare_queue(
        queue_name, durable=True, arguments={"x-queue-type": queue_type}
    )
    try:
        async with app:
            # competing with a plain consumer of the queue: each message to one of them
            await amqp.set_qos(prefetch_count=1)
            tag = await queue.consume(on_plain)
            for i in range(1, 31):
                await send(i)
            await until(lambda: len(handled) + len(plain) == 30)
            await queue.cancel(tag)
            ours = {u for u, _ in handled}
            theirs = {json.loads(b)["user_id"] for b in plain}
            assert ours and theirs and not ours & theirs
            assert ours | theirs == {f"u{i}" for i in range(1, 31)}
            assert {t for _, t in handled} == {None}  # no type header: any handler takes it
            # alone on it: a failing message is retried through Herald's delay queue back
            # into the source queue, then dead-lettered, and its replay comes back
            await send(0)
            dlq = dead_letter_topic(queue_name, "welcome")
            async with DeadLetters(RABBIT, dlq) as letters:
                await until(lambda: failures["u0"] == FAST.attempts * FAST.deliveries)
                with anyio.fail_after(10):
                    while not (found := await letters.list()):
                        await anyio.sleep(0.05)
                [letter] = found
                assert letter.headers["dlq.reason"] == "retries exhausted"
                assert letter.headers["dlq.attempts"] == str(FAST.deliveries)
                healed.set()
                assert await letters.replay() == 1
            await until(lambda: "u0" in {u for u, _ in handled})
        declared = await amqp.declare_queue(queue_name, passive=True)
        assert declared.declaration_result.message_count == 0
    finally:
        await drop(RABBIT, queue_name)
        await amqp.queue_delete(queue_name)


async def test_rabbitmq_bind_on_the_subscriber_and_an_existing_exchange(
    amqp: aio_pika.abc.AbstractChannel,
) -> None:
    """A plain producer's own topic exchange (declared without Herald's alternate exchange)
    is used as it is; ``bind=`` on the subscriber routes by routing key, one pattern or several;
    the routing key is the message key."""
    name = unique_name("orders")
    app = App("shop", broker=RABBIT)
    got: dict[str, list[tuple[str, str | None]]] = {"high": [], "rest": []}

    @app.subscriber(name, group="high", bind="order.high.*")
    async def high(event: UserRegistered, ctx: Context) -> None:
        got["high"].append((event.user_id, ctx.message.key))

    @app.subscriber(name, group="rest", bind=["order.low.*", "order.mid.#"])
    async def rest(event: UserRegistered, ctx: Context) -> None:
        got["rest"].append((event.user_id, ctx.message.key))

    exchange = await amqp.declare_exchange(name, aio_pika.ExchangeType.TOPIC, durable=True)
    try:
        async with app:
            for i, key in enumerate(["order.high.1", "order.low.2", "order.mid.a.b", "x.y"]):
                await exchange.publish(aio_pika.Message(user(i)), routing_key=key)
            await app.publish(name, UserRegistered(user_id="u9", email="e"), key="order.high.9")
            await until(lambda: len(got["high"]) == 2 and len(got["rest"]) == 2)
            await anyio.sleep(0.3)
        assert sorted(got["high"]) == [("u0", "order.high.1"), ("u9", "order.high.9")]
        assert sorted(got["rest"]) == [("u1", "order.low.2"), ("u2", "order.mid.a.b")]
    finally:
        await drop(RABBIT, name)


async def test_rabbitmq_source_and_bind_errors(amqp: aio_pika.abc.AbstractChannel) -> None:
    """A missing source queue, and URL and subscriber binds that disagree, fail the start."""
    name = unique_name("orders")
    app = App("shop", broker=RABBIT)

    @app.subscriber(name, group="g", source=unique_name("missing"))
    async def handle(event: UserRegistered) -> None: ...

    app2 = App("shop", broker=f"{RABBIT}?bind=g:order.eu.%23")

    @app2.subscriber(name, group="g", bind="order.us.#")
    async def handle2(event: UserRegistered) -> None: ...

    try:
        with pytest.raises(TransportError, match=r"does not exist.*source= names an existing"):
            await app.start()
        with pytest.raises(ValueError, match="differs from the broker URL's bind"):
            await app2.start()
    finally:
        await drop(RABBIT, dead_letter_topic(name, "g"))  # made before the group is joined
        await drop(RABBIT, name)


# --- Redis, Kafka, SQLite: the topic is the engine's object --------------------------------


async def test_redis_plain_xadd_entries() -> None:
    """``XADD <topic> * user_id u0 email ...`` (no ``payload`` field) arrives as the JSON
    object of its fields; an entry with a ``payload`` field has that as payload and its other
    fields as headers; the entry id is the message id."""
    require_server("redis")
    name = unique_name("users")
    app = App("svc", broker=REDIS)
    got: list[tuple[UserRegistered, Any]] = []

    @app.subscriber(name, group="g")
    async def handle(event: UserRegistered, ctx: Context) -> None:
        got.append((event, ctx.message))

    raw = aioredis.Redis.from_url(REDIS)
    try:
        async with app:
            eid = await raw.xadd(name, {"user_id": "u0", "email": "u0@example.com"})
            await raw.xadd(name, {"payload": user(1), "source": "signup-form"})
            await until(lambda: len(got) == 2)
        (first, m0), (second, m1) = got
        assert first == UserRegistered(user_id="u0", email="u0@example.com")
        assert m0.id == eid.decode() and m0.type is None and m0.key is None
        assert second.user_id == "u1" and m1.headers["source"] == "signup-form"
    finally:
        await drop(REDIS, name)
        await raw.aclose()


async def test_kafka_plain_records() -> None:
    """A plain aiokafka record (key and value bytes, no headers) is consumed with its key as
    the message key and ``<topic>:<partition>:<offset>`` as a stable id."""
    require_server("kafka")
    name = unique_name("users")
    app = App("svc", broker=KAFKA)
    got: list[tuple[UserRegistered, Any]] = []

    @app.subscriber(name, group=unique_name("g"))
    async def handle(event: UserRegistered, ctx: Context) -> None:
        got.append((event, ctx.message))

    producer = AIOKafkaProducer(bootstrap_servers="127.0.0.1:9092", acks="all")
    try:
        async with app:  # creates the topic
            await producer.start()
            meta = await producer.send_and_wait(name, user(0), key=b"u0")
            await until(lambda: len(got) == 1, timeout=60)
        [(event, m)] = got
        assert event.user_id == "u0" and m.key == "u0" and m.type is None and m.headers == {}
        assert m.id == f"{name}:{meta.partition}:{meta.offset}"
    finally:
        await producer.stop()
        await drop(KAFKA, name)


async def test_sqlite_plain_insert(tmp_path: Path) -> None:
    """``INSERT INTO messages(topic, payload)`` from the sqlite3 module, while the app runs."""
    db = tmp_path / "broker.db"
    app = App("svc", broker=f"sqlite:///{db}")
    got: list[UserRegistered] = []

    @app.subscriber("users", group="g")
    async def handle(event: UserRegistered) -> None:
        got.append(event)

    async with app:
        with sqlite3.connect(db) as conn:
            conn.execute("INSERT INTO messages(topic, payload) VALUES ('users', ?)", (user(0),))
        await until(lambda: len(got) == 1)
    assert got == [UserRegistered(user_id="u0", email="u0@example.com")]


#: the options each engine cannot honour (each must be refused, never ignored)
REFUSED = {
    "memory": ["bind", "source"],
    "sqlite": ["bind", "source"],
    "redis": ["bind", "source"],
    "kafka": ["bind", "source"],
    "nats": ["source"],
    "mqtt": ["source"],
    "rabbitmq": [],
}


async def test_unsupported_options_are_refused_at_start(broker_url: str) -> None:
    engine = {"amqp": "rabbitmq"}.get(broker_url.split(":")[0], broker_url.split(":")[0])
    for option in REFUSED[engine]:
        app = App("svc", broker=broker_url)
        kwargs: dict[str, Any] = {option: "x.y"}

        @app.subscriber(unique_name("t"), group="g", **kwargs)
        async def handle(event: UserRegistered) -> None: ...

        with pytest.raises(ValueError, match=f"^{option}= is not supported by the {engine} "):
            await app.start()
        assert not app.consumers


def test_subscriber_checks_bind_and_source_at_registration() -> None:
    app = App("svc", broker="memory://")
    with pytest.raises(ValueError, match="bind patterns must be non-empty"):
        app.subscriber("t", bind=["a.*", ""])
    with pytest.raises(ValueError, match="source must be a non-empty name"):
        app.subscriber("t", source="")

    @app.subscriber("t", group="g", bind="a.*")
    async def one(event: UserRegistered) -> None: ...

    with pytest.raises(ValueError, match="other bind/source"):

        @app.subscriber("t", group="g", bind="b.*")
        async def two(event: UserRegistered) -> None: ...

    assert check_topology(["a.*"], None) == (("a.*",), None)
    with pytest.raises(ValueError, match="sequence of patterns"):
        check_topology("a.*", None)


# --- NATS ---------------------------------------------------------------------------------


@pytest.fixture
async def nc() -> AsyncIterator[nats.NATS]:
    require_server("nats")
    client = await nats.connect(NATS)
    try:
        yield client
    finally:
        await client.close()


async def test_nats_core_publish_and_bound_subjects(nc: nats.NATS) -> None:
    """Core-NATS publishes (no JetStream, no Herald headers) to the topic's subject are kept
    once the app made the topic's stream; ``bind=`` a wildcard keeps and delivers the matching
    subjects to that group only, with the subject as key."""
    base = unique_name("sensors").replace("-", "_")
    name = f"{base}.all"
    app = App("svc", broker=NATS)
    got: dict[str, list[tuple[str, str | None]]] = {"all": [], "plain": []}

    @app.subscriber(name, group="all", bind=f"{base}.*")
    async def every(event: UserRegistered, ctx: Context) -> None:
        got["all"].append((event.user_id, ctx.message.key))

    @app.subscriber(name, group="plain")
    async def own(event: UserRegistered, ctx: Context) -> None:
        got["plain"].append((event.user_id, ctx.message.key))

    try:
        async with app:
            await nc.publish(name, user(0))
            await nc.publish(f"{base}.kitchen", user(1))
            await nc.publish(f"{base}.kitchen.deep", user(2))  # matches no pattern
            await nc.flush()
            await app.publish(name, UserRegistered(user_id="u3", email="e"), key="k3")
            await until(lambda: len(got["all"]) == 3 and len(got["plain"]) == 2)
            await anyio.sleep(0.3)
        assert sorted(got["all"]) == [("u0", None), ("u1", f"{base}.kitchen"), ("u3", "k3")]
        assert sorted(got["plain"]) == [("u0", None), ("u3", "k3")]
    finally:
        await drop(NATS, name)


async def test_nats_existing_stream(nc: nats.NATS) -> None:
    """JetStream publishes to a subject of a stream someone else made: a topic named after
    that subject reads the stream as it is (from its start), and Herald's publishes to the
    topic go into it; a bind wildcard reads more of it."""
    base = unique_name("events").replace("-", "_")
    stream = base.upper()
    js = nc.jetstream()
    await js.add_stream(name=stream, subjects=[f"{base}.>"])
    try:
        ack = await js.publish(f"{base}.user.registered", user(0))
        await js.publish(f"{base}.user.deleted", user(1))
        app = App("svc", broker=NATS)
        got: dict[str, list[tuple[str, str, str | None]]] = {"reg": [], "user": []}

        @app.subscriber(f"{base}.user.registered", group="reg")
        async def reg(event: UserRegistered, ctx: Context) -> None:
            got["reg"].append((event.user_id, ctx.message.id, ctx.message.key))

        @app.subscriber(f"{base}.user.registered", group="user", bind=f"{base}.user.*")
        async def users(event: UserRegistered, ctx: Context) -> None:
            got["user"].append((event.user_id, ctx.message.id, ctx.message.key))

        async with app:
            await until(lambda: len(got["reg"]) == 1 and len(got["user"]) == 2)
            await app.publish(f"{base}.user.registered", UserRegistered(user_id="u2", email="e"))
            await until(lambda: len(got["reg"]) == 2 and len(got["user"]) == 3)
        assert got["reg"][0] == ("u0", f"nats:{stream}:{ack.seq}", None)
        assert ("u1", f"nats:{stream}:{ack.seq + 1}", f"{base}.user.deleted") in got["user"]
        info = await js.stream_info(stream)
        assert info.state.messages == 3  # Herald's publish went into the existing stream
        assert sorted(c.name for c in await js.consumers_info(stream)) == sorted(
            f"{base.replace('.', '~')}~user~registered:{g}" for g in ("reg", "user")
        )
    finally:
        await js.delete_stream(stream)


async def test_nats_bind_errors() -> None:
    require_server("nats")
    t = open_transport(NATS)
    async with t:
        with pytest.raises(ValueError, match=r"does not match topic 'a\.b'"):
            await t.subscribe("a.b", "g", bind=["c.*"])
        with pytest.raises(ValueError, match=r"^bind= is not supported by the nats.*one subject"):
            await t.subscribe("a.b", "g", bind=["a.*", "b.*"])
        with pytest.raises(ValueError, match="not a NATS subject"):
            await t.subscribe("a.b", "g", bind=["a.b*"])


# --- MQTT ---------------------------------------------------------------------------------


async def test_mqtt_wildcard_filters() -> None:
    """Plain publishes to topics matched by ``+`` and ``#`` filters reach the group, with the
    MQTT topic as key; other topics don't; overlapping filters are refused."""
    require_server("mqtt")
    name = unique_name("home")
    app = App("svc", broker=MQTT)
    got: list[tuple[str, str | None]] = []

    @app.subscriber(name, group="g", bind=[f"{name}/+/temp", f"{name}/garage/door/#"])
    async def handle(event: UserRegistered, ctx: Context) -> None:
        got.append((event.user_id, ctx.message.key))

    try:
        async with app:
            async with aiomqtt.Client("127.0.0.1", 1883) as plain:
                await plain.publish(f"{name}/kitchen/temp", user(0), qos=1)
                await plain.publish(f"{name}/garage/door/state", user(1), qos=1)
                await plain.publish(f"{name}/kitchen/humidity", user(2), qos=1)
                await plain.publish(name, user(3), qos=1)  # the topic itself
            await until(lambda: len(got) == 3)
            await anyio.sleep(0.3)
        assert sorted(got) == [
            ("u0", f"{name}/kitchen/temp"),
            ("u1", f"{name}/garage/door/state"),
            ("u3", None),
        ]
        t = open_transport(MQTT)
        async with t:
            with pytest.raises(ValueError, match="overlap"):
                await t.subscribe(name, "g2", bind=[f"{name}/+/temp", f"{name}/kitchen/+"])
            with pytest.raises(ValueError, match="not an MQTT topic filter"):
                await t.subscribe(name, "g2", bind=[f"{name}/a+"])
    finally:
        await _mqtt_cleanup(name)


async def test_mqtt_retained_message_once_per_group() -> None:
    """A retained message published before the group existed is delivered to it once — not
    again when its consumer restarts (Mosquitto sends retained messages to shared
    subscriptions on every SUBSCRIBE unless Retain Handling says otherwise) — and never to a
    group joining at ``latest``."""
    require_server("mqtt")
    name = unique_name("state")
    got: Counter[str] = Counter()
    async with aiomqtt.Client("127.0.0.1", 1883) as plain:
        await plain.publish(name, user(0), qos=1, retain=True)
    try:
        for _ in range(2):
            app = App("svc", broker=MQTT)

            @app.subscriber(name, group="early")
            async def early(event: UserRegistered) -> None:
                got["early"] += 1

            @app.subscriber(name, group="late", start="latest")
            async def late(event: UserRegistered) -> None:
                got["late"] += 1

            async with app:
                await anyio.sleep(1.0)
        assert got == Counter(early=1)
    finally:
        await _mqtt_cleanup(name)


async def _mqtt_cleanup(name: str) -> None:
    t = open_transport(MQTT)
    async with t:
        await t.delete_topic(name)  # sessions, and the retained message on the topic
