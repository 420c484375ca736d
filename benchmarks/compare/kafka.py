"""Kafka comparison: raw aiokafka and FastStream against Herald's ``kafka://`` transport.

Raw is what a careful hand-written aiokafka program does with the same guarantees: an
idempotent producer with ``acks=all`` (plain ``acks=all`` on a broker that refuses
idempotence, as Herald does), every message sent then all futures awaited, a consumer reading
``getmany`` batches and committing manually after each batch. FastStream uses its documented
defaults plus commit after handling (``ack_policy=AckPolicy.ACK``; FastStream 0.7 has no
``auto_commit`` any more). ``HERALD_KAFKA_URL`` picks the broker (default Tansu on 9092).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import anyio
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer  # type: ignore[import-untyped]
from aiokafka.admin import AIOKafkaAdminClient, NewTopic  # type: ignore[import-untyped]
from aiokafka.errors import UnknownError  # type: ignore[import-untyped]

from benchmarks.compare.common import fresh_name, paced, payload, sent_at

NAME = "kafka"
#: Tansu by default; ``HERALD_KAFKA_URL=kafka://127.0.0.1:9093`` measures noida-db
DEFAULT_URL = os.environ.get("HERALD_KAFKA_URL", "kafka://127.0.0.1:9092")
_PARTITIONS = 4


def _bootstrap(url: str) -> str:
    return url.split("://", 1)[1].split("?", 1)[0].rpartition("@")[2]


async def _producer(bs: str) -> AIOKafkaProducer:
    for idempotent in (True, False):
        p = AIOKafkaProducer(bootstrap_servers=bs, acks="all", enable_idempotence=idempotent)
        try:
            await p.start()
            return p
        except UnknownError:
            await p.stop()
    raise RuntimeError("unreachable")


async def _topic(bs: str) -> tuple[AIOKafkaAdminClient, str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bs)
    await admin.start()
    name = fresh_name("cmp")
    await admin.create_topics([NewTopic(name, _PARTITIONS, 1)])
    return admin, name


async def _joined(bs: str, topic: str) -> AIOKafkaConsumer:
    """A consumer that has its partitions (the clock starts after the join, as Herald's)."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bs,
        group_id=fresh_name("g"),
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    await consumer.start()
    while not consumer.assignment():
        await consumer.getmany(timeout_ms=50)
    return consumer


async def _consume(consumer: AIOKafkaConsumer, n: int, on: Any) -> None:
    try:
        seen = 0
        while seen < n:
            batches = await consumer.getmany(timeout_ms=200, max_records=500)
            for records in batches.values():
                for r in records:
                    on(r.value)
                seen += len(records)
            if batches:
                await consumer.commit()
    finally:
        await consumer.stop()


async def raw_throughput(url: str, n: int) -> float:
    bs = _bootstrap(url)
    admin, topic = await _topic(bs)
    producer = await _producer(bs)
    try:
        consumer = await _joined(bs, topic)
        start = time.perf_counter()
        async with anyio.create_task_group() as tg:
            tg.start_soon(_consume, consumer, n, lambda body: None)
            futures = [await producer.send(topic, payload(i)) for i in range(n)]
            for f in futures:
                await f
        return n / (time.perf_counter() - start)
    finally:
        await producer.stop()
        await admin.delete_topics([topic])
        await admin.close()


async def raw_latency(url: str, rate: float, seconds: float) -> list[float]:
    bs = _bootstrap(url)
    admin, topic = await _topic(bs)
    producer = await _producer(bs)
    latencies: list[float] = []
    total = int(rate * seconds)
    try:
        consumer = await _joined(bs, topic)
        async with anyio.create_task_group() as tg:
            tg.start_soon(
                _consume, consumer, total, lambda b: latencies.append(time.time() - sent_at(b))
            )

            async def send(seq: int) -> None:
                await producer.send_and_wait(topic, payload(seq))

            await paced(rate, seconds, send)
        return latencies
    finally:
        await producer.stop()
        await admin.delete_topics([topic])
        await admin.close()


def _faststream(bs: str, topic: str, handler: Any) -> Any:
    """A broker with one subscriber committing after each handled message; per-message logs
    at DEBUG (FastStream logs every message at INFO by default, which would dominate)."""
    from faststream import AckPolicy
    from faststream.kafka import KafkaBroker

    broker = KafkaBroker(bs, log_level=logging.DEBUG)
    broker.subscriber(
        topic, group_id=fresh_name("g"), ack_policy=AckPolicy.ACK, auto_offset_reset="earliest"
    )(handler)
    return broker


async def _warm_up(broker: Any, topic: str, handled: Any) -> None:
    """Wait until the subscriber has joined its group and handled one message, so the clock
    starts after the join as for raw and Herald."""
    await broker.publish({"warm": True, "sent_at": time.time()}, topic)
    with anyio.fail_after(60):
        while not handled():
            await anyio.sleep(0.01)


async def faststream_throughput(url: str, n: int) -> float:
    bs = _bootstrap(url)
    admin, topic = await _topic(bs)
    done = anyio.Event()
    count = 0

    async def handle(body: dict[str, Any]) -> None:  # FastStream decodes the JSON
        nonlocal count
        count += 1
        if count > n:
            done.set()

    broker = _faststream(bs, topic, handle)
    try:
        async with broker:
            await broker.start()
            await _warm_up(broker, topic, lambda: count >= 1)
            start = time.perf_counter()
            # the documented batch API; one call is one record batch (16 KiB: 80 messages)
            for i in range(0, n, 80):
                await broker.publish_batch(
                    *(payload(j) for j in range(i, min(n, i + 80))), topic=topic
                )
            await done.wait()
            return n / (time.perf_counter() - start)
    finally:
        await admin.delete_topics([topic])
        await admin.close()


async def faststream_latency(url: str, rate: float, seconds: float) -> list[float]:
    bs = _bootstrap(url)
    admin, topic = await _topic(bs)
    latencies: list[float] = []
    warm = False

    async def handle(body: dict[str, Any]) -> None:
        nonlocal warm
        if body.get("warm"):
            warm = True
        else:
            latencies.append(time.time() - float(body["sent_at"]))

    broker = _faststream(bs, topic, handle)
    try:
        async with broker:
            await broker.start()
            await _warm_up(broker, topic, lambda: warm)

            async def send(seq: int) -> None:
                await broker.publish(payload(seq), topic)

            total = await paced(rate, seconds, send)
            with anyio.move_on_after(10):
                while len(latencies) < total:
                    await anyio.sleep(0.01)
        return latencies
    finally:
        await admin.delete_topics([topic])
        await admin.close()
