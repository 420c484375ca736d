"""Kafka consumer groups of Herald groups (herald.transports.kafka.groups): one Kafka group per
(group, topic), so one topic's rebalances never touch another's; offsets an older Herald
committed under the bare group name are taken over. On Tansu (9092): noida-db 0.2 cannot
settle a second member's join (see test_kafka_transport.test_rebalance_between_two_members)."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition  # type: ignore[import-untyped]

from herald.testing.conformance import connected, drain, make_messages, subscribed, unique_name
from herald.testing.servers import require_server
from herald.transports.kafka import KafkaTransport
from herald.transports.kafka.groups import group_id

from .conftest import BROKERS, topic

pytestmark = pytest.mark.anyio
URL = f"{BROKERS['kafka']}?session_timeout_ms=6000&heartbeat_interval_ms=300"
SERVERS = BROKERS["kafka"].removeprefix("kafka://")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(autouse=True)
def _kafka() -> None:
    require_server("kafka")


async def test_a_member_joining_or_leaving_one_topic_leaves_the_other_alone() -> None:
    """Worker A consumes topics 1 and 2 in group g; worker B joins g on topic 1, then
    leaves. A's member on topic 2 is never revoked (no rebalance reaches it) and keeps
    delivering, while its member on topic 1 is rebalanced twice."""
    t1, t2, g = topic(), topic(), unique_name("g")
    revoked = {t1: 0, t2: 0}
    async with connected(URL) as a, connected(URL) as b:
        assert isinstance(a, KafkaTransport)
        sub1 = await a.subscribe(t1, g)
        sub2 = await a.subscribe(t2, g)
        for t in (t1, t2):
            member: Any = a._members[(t, g)]
            real = member.on_revoked

            async def counting(tps: Any, real: Any = real, t: str = t) -> None:
                revoked[t] += 1
                await real(tps)

            member.on_revoked = counting
        try:
            seen: set[str] = set()
            sent: list[str] = []

            async def keep_consuming_t2(stop: anyio.Event) -> None:
                while not stop.is_set():
                    batch = await sub2.fetch(100, 0.2)
                    seen.update(d.message.id for d in batch)
                    await sub2.ack(batch)
                    await sub1.ack(await sub1.fetch(100, 0.01))  # topic 1's member keeps polling

            async def publish_t2(stop: anyio.Event) -> None:
                while not stop.is_set():
                    batch = make_messages(t2, 1)
                    await a.publish(t2, batch)
                    sent.extend(m.id for m in batch)
                    await anyio.sleep(0.1)

            stop = anyio.Event()
            with anyio.fail_after(60):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(keep_consuming_t2, stop)
                    tg.start_soon(publish_t2, stop)
                    async with subscribed(b, t1, g):  # B joins topic 1 ...
                        await anyio.sleep(1)
                    await anyio.sleep(2)  # ... and leaves it
                    while not set(sent) <= seen:
                        await anyio.sleep(0.05)
                    stop.set()
        finally:
            await sub1.close()
            await sub2.close()
    assert revoked[t2] == 0, "a rebalance on topic 1 reached topic 2's member"
    assert revoked[t1] >= 1  # the join (and the leave) did rebalance topic 1's group


async def test_offsets_committed_under_the_bare_group_name_are_taken_over() -> None:
    """An older Herald committed offset 3 for group g on a one-partition topic under the Kafka
    group id ``g``: a new member of g starts at offset 3, commits under ``g:<topic>``, and
    leaves the old group's offset alone."""
    t, g = topic(), unique_name("g")
    tp = TopicPartition(t, 0)
    published = make_messages(t, 5)
    async with connected(f"{URL}&partitions=1") as transport:
        await transport.publish(t, published)
        old = AIOKafkaConsumer(bootstrap_servers=SERVERS, group_id=g, enable_auto_commit=False)
        await old.start()
        try:
            old.assign([tp])  # no group join: only a commit, as the old Herald left it
            await old.commit({tp: 3})
        finally:
            await old.stop()
        async with subscribed(transport, t, g) as sub:
            rest = [m.id for m in published[3:]]
            seen = await drain(sub, rest, timeout=20)
            assert set(seen) == set(rest)
    assert await _committed(g, tp) == 3  # the old group is untouched
    assert await _committed(group_id(g, t), tp) == 5  # the new one took over and moved on


async def _committed(group: str, tp: TopicPartition) -> int | None:
    reader = AIOKafkaConsumer(bootstrap_servers=SERVERS, group_id=group, enable_auto_commit=False)
    await reader.start()
    try:
        offset: int | None = await reader.committed(tp)
        return offset
    finally:
        await reader.stop()
