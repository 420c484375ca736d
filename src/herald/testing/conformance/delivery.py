"""Publish, subscribe, fan-out, concurrency and per-key order."""

from __future__ import annotations

from collections import Counter, defaultdict

import anyio
import pytest

from herald.message import CORRELATION_ID, OCCURRED_AT, Message, new_id
from herald.testing.conformance.suite import Suite
from herald.testing.helpers import (
    as_published,
    assert_exactly,
    drain,
    expect_nothing,
    ids,
    make_messages,
    single,
    subscribed,
    unique_name,
)
from herald.transports import Delivery, Subscription, Transport


class DeliveryTests(Suite):
    """Publish, subscribe, fan-out, concurrency and per-key order."""

    # -- 1. publish before subscribe -----------------------------------------------------

    async def test_publish_before_subscribe_delivers_intact(self, transport: Transport) -> None:
        """Messages published before a group exists reach a new ``start="earliest"`` group
        with id, key, type, payload bytes and headers unchanged; ``message.topic`` is replaced
        by the topic published to. A second new group gets them too."""
        if not transport.features.replay:
            pytest.skip("transport does not replay messages to new groups (features.replay)")
        topic = unique_name("pbs")
        published = [
            Message(
                id=new_id(),
                topic="ignored-topic",
                key="order-1",
                type="OrderPlaced",
                payload=b'{"order": 1}',
                headers={CORRELATION_ID: new_id(), OCCURRED_AT: "2026-11-25T10:00:00.123Z"},
            ),
            Message(id=new_id(), topic=topic, payload=b"no key, no type, no headers"),
            Message(id=new_id(), topic=topic, key="order-2", payload=b"\x00\x01", headers={}),
        ]
        await transport.publish(topic, published)
        for group in (unique_name("g1"), unique_name("g2")):
            async with subscribed(transport, topic, group, start="earliest") as sub:
                seen = await drain(sub, ids(published), timeout=self.delivery_timeout)
                assert_exactly(seen, ids(published))
                for m in published:
                    d = single(seen, m.id)
                    assert d.message == as_published(m, topic)
                    assert d.attempt == 1
                await expect_nothing(sub, self.quiet_period)

    async def test_start_latest_skips_earlier_messages(self, transport: Transport) -> None:
        """A new group with ``start="latest"`` gets only messages published after it joined."""
        topic, group = unique_name("latest"), unique_name("g")
        before = make_messages(topic, 5, prefix="before")
        after = make_messages(topic, 5, prefix="after")
        await transport.publish(topic, before)
        async with subscribed(transport, topic, group, start="latest") as sub:
            await transport.publish(topic, after)
            seen = await drain(sub, ids(after), timeout=self.delivery_timeout)
            assert_exactly(seen, ids(after))
            await expect_nothing(sub, self.quiet_period)

    # -- 2. concurrency ------------------------------------------------------------------

    async def test_concurrent_publishers_and_consumers_lose_nothing(
        self, transport: Transport
    ) -> None:
        """4 publishers x 500 messages (batches of 1, 7 and 50) with 3 competing consumers in
        one group: every message is delivered exactly once, at attempt 1, and acked."""
        topic, group = unique_name("conc"), unique_name("g")
        publishers, per_publisher = 4, 500
        batches = [
            make_messages(topic, per_publisher, key=f"p{p}", prefix=f"p{p}")
            for p in range(publishers)
        ]
        expected = {m.id for batch in batches for m in batch}
        deliveries: Counter[str] = Counter()
        attempts: Counter[int] = Counter()
        done = anyio.Event()

        async def publish(messages: list[Message]) -> None:
            i, sizes = 0, [1, 7, 50]
            while i < len(messages):
                size = sizes[i % len(sizes)]
                await transport.publish(topic, messages[i : i + size])
                i += size

        async def consume(sub: Subscription) -> None:
            while not done.is_set():
                batch = await sub.fetch(50, 0.2)
                if not batch:
                    continue
                await sub.ack(batch)
                for d in batch:
                    deliveries[d.message.id] += 1
                    attempts[d.attempt] += 1
                if expected.issubset(deliveries.keys()):
                    done.set()

        subs = [await transport.subscribe(topic, group, start="earliest") for _ in range(3)]
        try:
            with anyio.move_on_after(self.delivery_timeout * 3):
                async with anyio.create_task_group() as tg:
                    for sub in subs:
                        tg.start_soon(consume, sub)
                    for batch in batches:
                        tg.start_soon(publish, batch)
            missing = expected - deliveries.keys()
            assert not missing, f"{len(missing)} of {len(expected)} messages never delivered"
            assert deliveries.keys() == expected
            dupes = {k: n for k, n in deliveries.items() if n != 1}
            assert not dupes, f"{len(dupes)} messages delivered more than once without a nack"
            assert attempts == {1: len(expected)}
            await expect_nothing(subs[0], self.quiet_period)
        finally:
            for sub in subs:
                await sub.close()

    async def test_many_topics_stay_isolated(self, transport: Transport) -> None:
        """20 topics used at once, all with the same group name: each consumer gets exactly
        its own topic's messages, each carrying its topic."""
        group = unique_name("g")
        topics = [unique_name(f"iso{i}") for i in range(20)]
        published = {t: make_messages(t, 15, prefix=t) for t in topics}
        results: dict[str, dict[str, list[Delivery]]] = {}

        async def consume(topic: str) -> None:
            async with subscribed(transport, topic, group) as sub:
                results[topic] = await drain(
                    sub, ids(published[topic]), timeout=self.delivery_timeout * 2
                )
                await expect_nothing(sub, self.quiet_period)

        for t in topics:
            await self.create_groups(transport, t, group)
        async with anyio.create_task_group() as tg:
            for t in topics:
                tg.start_soon(transport.publish, t, published[t])
        async with anyio.create_task_group() as tg:
            for t in topics:
                tg.start_soon(consume, t)
        for t in topics:
            assert_exactly(results[t], ids(published[t]))
            for m in published[t]:
                assert single(results[t], m.id).message == m

    # -- 6. ordering -----------------------------------------------------------------------

    async def test_order_per_key_kept(self, transport: Transport) -> None:
        """With ``ordered_per_key``, one consumer gets each key's messages in publish order,
        for 5 keys interleaved over single and batched publishes."""
        if not transport.features.ordered_per_key:
            pytest.skip("transport does not promise order per key (features.ordered_per_key)")
        topic, group = unique_name("order"), unique_name("g")
        keys = [f"key-{k}" for k in range(5)]
        published: list[Message] = []
        for i in range(200):
            key = keys[(i * 7 + i // 3) % len(keys)]
            published.append(Message(id=new_id(), topic=topic, key=key, payload=str(i).encode()))
        await self.create_groups(transport, topic, group)
        i = 0
        while i < len(published):  # batches of 1, 2, 3, ... interleave keys within a batch
            size = i % 9 + 1
            await transport.publish(topic, published[i : i + size])
            i += size
        received: dict[str, list[str]] = defaultdict(list)
        async with subscribed(transport, topic, group) as sub:
            with anyio.fail_after(self.delivery_timeout * 2):
                count, sizes = 0, [1, 5, 17, 50]
                while count < len(published):
                    batch = await sub.fetch(sizes[count % len(sizes)], 0.25)
                    for d in batch:
                        assert d.message.key is not None
                        received[d.message.key].append(d.message.id)
                    count += len(batch)
                    if batch:
                        await sub.ack(batch)
            await expect_nothing(sub, self.quiet_period)
        for key in keys:
            want = [m.id for m in published if m.key == key]
            assert received[key] == want, f"order of key {key!r} not kept"

    # -- 9. fan-out ------------------------------------------------------------------------

    async def test_every_group_gets_the_whole_stream(self, transport: Transport) -> None:
        """Three groups each get every message; a group that was offline gets what was
        published meanwhile when it rejoins (even with ``start="latest"``, since the group
        already exists), and nothing it had already acked."""
        topic = unique_name("fanout")
        groups = [unique_name(f"g{i}") for i in range(3)]
        batch1 = make_messages(topic, 30, prefix="one")
        batch2 = make_messages(topic, 20, prefix="two")
        subs = [await transport.subscribe(topic, g, start="earliest") for g in groups]
        try:
            await transport.publish(topic, batch1)
            for sub in subs:
                seen = await drain(sub, ids(batch1), timeout=self.delivery_timeout)
                assert_exactly(seen, ids(batch1))
            await subs[2].close()
            await transport.publish(topic, batch2)
            for sub in subs[:2]:
                seen = await drain(sub, ids(batch2), timeout=self.delivery_timeout)
                assert_exactly(seen, ids(batch2))
            subs[2] = await transport.subscribe(topic, groups[2], start="latest")
            seen = await drain(subs[2], ids(batch2), timeout=self.delivery_timeout)
            assert_exactly(seen, ids(batch2))
            for sub in subs:
                await expect_nothing(sub, self.quiet_period)
        finally:
            for sub in subs:
                await sub.close()
