"""The transport conformance suite: one set of tests every Herald transport must pass.

Like Watermill's universal Pub/Sub tests, the suite is written against the contract in
:mod:`herald.transports.base` only. Tests branch on :class:`~herald.transports.Features` flags,
never on a transport's class. A transport's test module subclasses :class:`TransportConformance`
and provides the ``broker_url`` fixture::

    from herald.testing.conformance import TransportConformance

    class TestSqlite(TransportConformance):
        lease_query = "visibility_timeout=1"

        @pytest.fixture
        def broker_url(self, tmp_path):
            return f"sqlite:///{tmp_path}/c.db"

Every test uses fresh topic and group names (uuid suffix), so the suite can run against a shared
real server, and closes every subscription and transport it opens. Every wait is bounded, so no
test can hang: a message that does not arrive fails the test with the ids that are missing.

Knobs a subclass may override (class attributes):

* ``lease_query`` / :meth:`TransportConformance.redelivery_url` - how to ask the transport for a
  short visibility timeout (lease), used by the crash and cancellation tests.
* ``redelivery_timeout`` - how long a crashed consumer's deliveries may take to come back on the
  ``redelivery_url`` transport.
* ``delivery_timeout`` - upper bound for a published message to be delivered.
* ``quiet_period`` - how long a test waits to be sure nothing more is delivered.
* ``delay_tolerance`` - how early a ``nack(delay=...)`` redelivery may come.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from itertools import pairwise
from typing import Any, ClassVar

import anyio
import pytest

from herald.message import CORRELATION_ID, OCCURRED_AT, TRACEPARENT, Message, new_id
from herald.transports import Delivery, Subscription, Transport, open_transport

__all__ = [
    "TransportConformance",
    "connected",
    "drain",
    "expect_nothing",
    "make_messages",
    "subscribed",
    "unique_name",
]

from herald.testing.helpers import (
    MiB,
    as_published,
    assert_exactly,
    connected,
    drain,
    expect_nothing,
    ids,
    make_messages,
    single,
    subscribed,
    unique_name,
)


class TransportConformance:
    """The universal transport test suite; subclass it and provide a ``broker_url`` fixture.

    Each test states the contract property it checks in its docstring. Tests that need a
    guarantee not every engine gives skip themselves based on ``transport.features``.
    """

    pytestmark = pytest.mark.anyio

    #: Query parameters appended to the URL by :meth:`redelivery_url` to get a short visibility
    #: timeout / lease, e.g. ``"visibility_timeout=1"``. Empty: the URL is used unchanged.
    lease_query: ClassVar[str] = ""
    #: Seconds within which a crashed consumer's deliveries must come back (redelivery URL).
    redelivery_timeout: ClassVar[float] = 15.0
    #: Seconds within which a published (or released) message must be delivered.
    delivery_timeout: ClassVar[float] = 10.0
    #: Seconds a test waits to conclude that nothing more is delivered.
    quiet_period: ClassVar[float] = 0.4
    #: How many seconds early a ``nack(delay=...)`` redelivery may arrive.
    delay_tolerance: ClassVar[float] = 0.1

    # -- fixtures a subclass provides or may override --

    @pytest.fixture
    def anyio_backend(self) -> str:
        """The suite runs on asyncio."""
        return "asyncio"

    @pytest.fixture
    def broker_url(self) -> str:
        """The URL of the transport under test; a subclass must override this fixture."""
        raise NotImplementedError("subclass TransportConformance and provide a broker_url fixture")

    def redelivery_url(self, url: str) -> str:
        """Return ``url`` configured for a short visibility timeout (crash/cancel tests)."""
        if not self.lease_query:
            return url
        return f"{url}{'&' if '?' in url else '?'}{self.lease_query}"

    def counts_crash_redeliveries(self, url: str) -> bool:
        """Whether the engine behind ``url`` lets the transport count redeliveries after a
        crash (``attempt >= 2``). True unless a subclass knows of a broker defect, which it
        should prove with a test of its own."""
        return True

    @pytest.fixture
    async def transport(self, broker_url: str) -> AsyncIterator[Transport]:
        """A connected transport for ``broker_url``, closed after the test."""
        async with connected(broker_url) as transport:
            yield transport

    async def create_groups(self, transport: Transport, topic: str, *groups: str) -> None:
        """Make ``groups`` exist on ``topic`` before a test publishes to it. Without
        ``features.replay`` (MQTT) a group only receives what is published after it first
        subscribed; with ``replay`` this is a no-op, so the tests check the same property."""
        if transport.features.replay:
            return
        for group in groups:
            sub = await transport.subscribe(topic, group)
            await sub.close()

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

    # -- 4/5. nack ---------------------------------------------------------------------

    async def test_nack_redelivers_with_next_attempt(self, transport: Transport) -> None:
        """``nack()`` gives the same message back with ``attempt + 1``; ``nack(delay)`` keeps
        it away for ``delay`` seconds without holding up other messages meanwhile."""
        topic, group = unique_name("nack"), unique_name("g")
        delay = 1.5
        [x] = make_messages(topic, 1, key="k", prefix="x")
        await self.create_groups(transport, topic, group)
        await transport.publish(topic, [x])
        async with subscribed(transport, topic, group) as sub:
            first = single(await drain(sub, [x.id], timeout=self.delivery_timeout, ack=False), x.id)
            assert first.attempt == 1
            await sub.nack(first)
            second = single(
                await drain(sub, [x.id], timeout=self.delivery_timeout, ack=False), x.id
            )
            assert second.attempt == 2
            assert second.message == x

            others_before = make_messages(topic, 3, key="k", prefix="y")
            await transport.publish(topic, others_before)
            nacked_at = time.monotonic()
            await sub.nack(second, delay=delay)
            others_after = make_messages(topic, 3, key="k", prefix="z")
            await transport.publish(topic, others_after)

            others = ids(others_before + others_after)
            seen = await drain(sub, others, timeout=delay * 0.8)
            others_done = time.monotonic()
            assert x.id not in seen, (
                f"nacked message came back {others_done - nacked_at:.3f}s after nack(delay={delay})"
            )
            assert_exactly(seen, others)

            seen = await drain(sub, [x.id], timeout=delay + self.delivery_timeout, ack=False)
            back_after = time.monotonic() - nacked_at
            third = single(seen, x.id)
            assert back_after >= delay - self.delay_tolerance, (
                f"nack(delay={delay}) redelivered after only {back_after:.3f}s"
            )
            assert third.attempt == 3
            assert third.message == x
            await sub.ack([third])
            await expect_nothing(sub, self.quiet_period)

    async def test_repeated_nacks_never_skip_a_message(self, transport: Transport) -> None:
        """Each of 30 messages nacked 3 times (with and without delay) then acked: every one is
        redelivered with attempts 1, 2, 3, 4 and acked exactly once; nothing comes back."""
        topic, group = unique_name("renack"), unique_name("g")
        nacks = 3
        published = make_messages(topic, 30)
        await self.create_groups(transport, topic, group)
        await transport.publish(topic, published)
        history: dict[str, list[int]] = defaultdict(list)
        acked: Counter[str] = Counter()
        async with subscribed(transport, topic, group) as sub:
            try:
                with anyio.fail_after(self.delivery_timeout * 2):
                    while len(acked) < len(published):
                        for i, d in enumerate(await sub.fetch(10, 0.25)):
                            history[d.message.id].append(d.attempt)
                            if len(history[d.message.id]) <= nacks:
                                await sub.nack(d, delay=0.05 if i % 2 else 0.0)
                            else:
                                await sub.ack([d])
                                acked[d.message.id] += 1
            except TimeoutError:
                pending = {k: v for k, v in history.items() if k not in acked}
                never = len(set(ids(published)) - history.keys())
                raise AssertionError(
                    f"{never} messages never delivered; unfinished attempt histories: "
                    f"{dict(list(pending.items())[:3])}"
                ) from None
            await expect_nothing(sub, self.quiet_period)
        assert set(acked) == set(ids(published))
        assert all(n == 1 for n in acked.values())
        wrong = {k: v for k, v in history.items() if v != list(range(1, nacks + 2))}
        assert not wrong, f"attempt histories not 1..{nacks + 1}: {dict(list(wrong.items())[:3])}"

    async def test_nack_delay_survives_reconnect(self, broker_url: str) -> None:
        """With ``native_delay`` the engine itself honours ``nack(delay)``: after the nacking
        transport is closed, another transport sees the message again only after the delay."""
        async with connected(broker_url) as transport:
            features = transport.features
            if not (features.native_delay and features.cross_process):
                pytest.skip("needs features.native_delay and features.cross_process")
            topic, group = unique_name("ndelay"), unique_name("g")
            delay = 1.5
            [x] = make_messages(topic, 1)
            await self.create_groups(transport, topic, group)
            await transport.publish(topic, [x])
            sub = await transport.subscribe(topic, group)
            d = single(await drain(sub, [x.id], timeout=self.delivery_timeout, ack=False), x.id)
            nacked_at = time.monotonic()
            await sub.nack(d, delay=delay)
        async with connected(broker_url) as other, subscribed(other, topic, group) as sub2:
            seen = await drain(sub2, [x.id], timeout=delay + self.delivery_timeout)
            back_after = time.monotonic() - nacked_at
            assert back_after >= delay - self.delay_tolerance, (
                f"nack(delay={delay}) redelivered after only {back_after:.3f}s"
            )
            assert single(seen, x.id).attempt == 2
            await expect_nothing(sub2, self.quiet_period)

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

    # -- 7/8. consumers leaving and joining ---------------------------------------------------

    async def test_closing_consumers_mid_stream_loses_nothing(self, transport: Transport) -> None:
        """Consumers close with unacked deliveries while new ones join and more is published:
        every message ends acked exactly once, acked messages never come back, and every
        redelivery carries a higher attempt than the one before."""
        topic, group = unique_name("close"), unique_name("g")
        first, second = make_messages(topic, 120, prefix="a"), make_messages(topic, 60, prefix="b")
        expected = set(ids(first + second))
        await self.create_groups(transport, topic, group)
        await transport.publish(topic, first)
        acked: set[str] = set()
        attempts: dict[str, list[int]] = defaultdict(list)
        came_back: list[str] = []
        round_no = 0

        async def member() -> None:
            async with subscribed(transport, topic, group) as sub:
                batch = await sub.fetch(16, 0.3)
                for d in batch:
                    if d.message.id in acked:
                        came_back.append(d.message.id)
                    attempts[d.message.id].append(d.attempt)
                keep = batch[: (len(batch) + 1) // 2]  # a lone delivery is acked
                if keep:
                    await sub.ack(keep)
                    acked.update(d.message.id for d in keep)
            # closing leaves the other half unacked

        with anyio.fail_after(self.delivery_timeout * 3):
            while acked != expected:
                round_no += 1
                if round_no == 3:
                    await transport.publish(topic, second)
                async with anyio.create_task_group() as tg:
                    tg.start_soon(member)
                    tg.start_soon(member)
                if round_no > 200:
                    break
        assert not came_back, f"acked messages delivered again: {came_back[:3]}"
        assert acked == expected, f"{len(expected - acked)} messages never acked"
        wrong = {
            k: v for k, v in attempts.items() if v[0] != 1 or any(b <= a for a, b in pairwise(v))
        }
        assert not wrong, f"attempts not starting at 1 and growing: {dict(list(wrong.items())[:3])}"
        assert any(len(v) > 1 for v in attempts.values()), "no message was ever redelivered"
        async with subscribed(transport, topic, group) as sub:
            await expect_nothing(sub, self.quiet_period)

    async def test_transport_close_returns_unacked(
        self, transport: Transport, broker_url: str
    ) -> None:
        """A second transport instance fetches, acks some and closes the whole transport
        (not the subscription): the unacked deliveries go to another member of the group,
        the acked ones never do."""
        if not transport.features.cross_process:
            pytest.skip("separate transport instances share a group only with cross_process")
        topic, group = unique_name("tclose"), unique_name("g")
        published = make_messages(topic, 20)
        await self.create_groups(transport, topic, group)
        await transport.publish(topic, published)
        async with connected(broker_url) as other:
            sub = await other.subscribe(topic, group)
            held = await sub.fetch(10, self.delivery_timeout)
            assert 1 <= len(held) <= 10
            await sub.ack(held[:4])
        acked = {d.message.id for d in held[:4]}
        returned = {d.message.id for d in held[4:]}
        rest = set(ids(published)) - acked
        async with subscribed(transport, topic, group) as sub:
            seen = await drain(sub, rest, timeout=self.delivery_timeout)
            assert_exactly(seen, rest)
            for mid in returned:
                assert single(seen, mid).attempt >= 2
            await expect_nothing(sub, self.quiet_period)

    async def test_subscribe_close_churn_corrupts_nothing(self, transport: Transport) -> None:
        """40 members subscribe, fetch, ack part, and close concurrently while messages are
        published: no message is held by two members at once, none comes back after its ack,
        and a final consumer receives exactly the messages not acked yet."""
        topic, group = unique_name("churn"), unique_name("g")
        published = make_messages(topic, 300)
        acked: set[str] = set()
        held: set[str] = set()
        violations: list[str] = []
        rng = random.Random(7)

        async def publisher() -> None:
            for i in range(0, len(published), 10):
                await transport.publish(topic, published[i : i + 10])
                await anyio.sleep(0.005)

        async def churner(n: int) -> None:
            await anyio.sleep(rng.random() * 0.5)
            sub = await transport.subscribe(topic, group)
            try:
                batch = await sub.fetch(rng.randint(1, 8), 0.05)
                for d in batch:
                    mid = d.message.id
                    if mid in held:
                        violations.append(f"{mid} delivered to two members at once")
                    if mid in acked:
                        violations.append(f"{mid} delivered again after its ack")
                    held.add(mid)
                await anyio.sleep(rng.random() * 0.05)  # hold them while others fetch
                keep = [d for d in batch if rng.random() < 0.5]
                if keep:
                    await sub.ack(keep)
                    acked.update(d.message.id for d in keep)
                for d in batch:  # released by the close below
                    held.discard(d.message.id)
            finally:
                await sub.close()

        await self.create_groups(transport, topic, group)
        with anyio.fail_after(self.delivery_timeout * 3):
            async with anyio.create_task_group() as tg:
                tg.start_soon(publisher)
                for n in range(40):
                    tg.start_soon(churner, n)
        assert not violations, violations[:5]
        rest = set(ids(published)) - acked
        async with subscribed(transport, topic, group) as sub:
            seen = await drain(sub, rest, timeout=self.delivery_timeout)
            assert_exactly(seen, rest)
            await expect_nothing(sub, self.quiet_period)

    async def test_cancelled_fetch_loses_nothing(self, broker_url: str) -> None:
        """Cancelled fetches lose nothing: anything claimed but not returned comes back to the
        still-open subscription (at once, or after the visibility timeout). Checked both for
        a fetch whose scope is already cancelled while messages wait, and for fetches
        cancelled at random moments while messages arrive."""
        url = self.redelivery_url(broker_url)
        async with connected(url) as transport:
            topic, group = unique_name("cancel"), unique_name("g")
            waiting = make_messages(topic, 10, prefix="waiting")
            arriving = make_messages(topic, 40, prefix="arriving")
            acked: set[str] = set()
            rng = random.Random(11)
            async with subscribed(transport, topic, group) as sub:
                await transport.publish(topic, waiting)
                for _ in range(5):
                    with anyio.CancelScope() as scope:
                        scope.cancel()
                        batch = await sub.fetch(2, 1.0)  # may raise, or return without waiting
                        with anyio.CancelScope(shield=True):
                            await sub.ack(batch)
                        acked.update(d.message.id for d in batch)

                for m in arriving:

                    async def publish_one(m: Message = m) -> None:
                        await anyio.sleep(rng.random() * 0.02)
                        await transport.publish(topic, [m])

                    async with anyio.create_task_group() as tg:
                        tg.start_soon(publish_one)
                        with anyio.move_on_after(rng.random() * 0.03):
                            batch = await sub.fetch(rng.randint(1, 3), 1.0)
                            if batch:
                                with anyio.CancelScope(shield=True):  # an ack must finish
                                    await sub.ack(batch)
                                acked.update(d.message.id for d in batch)
                rest = set(ids(waiting + arriving)) - acked
                seen = await drain(
                    sub, rest, timeout=self.redelivery_timeout + self.delivery_timeout
                )
                assert not (seen.keys() & acked), "acked messages came back"
                assert seen.keys() == rest
                await expect_nothing(sub, self.quiet_period)

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

    # -- 10. crash ---------------------------------------------------------------------------

    async def _kill_worker_mid_stream(self, broker_url: str) -> tuple[dict[str, Any], set[str]]:
        """Publish 30 messages; a worker process fetches 12, acks 4 and is SIGKILLed. Then
        drain the group on the redelivery URL until every message the worker did not ack was
        delivered; return the worker's report and the ids delivered after the kill."""
        url = self.redelivery_url(broker_url)
        async with connected(url) as transport:
            features = transport.features
            if not (features.cross_process and features.persistent):
                pytest.skip("needs features.cross_process and features.persistent")
            topic, group = unique_name("kill"), unique_name("g")
            published = make_messages(topic, 30)
            await self.create_groups(transport, topic, group)
            await transport.publish(topic, published)
            report = await _run_worker_until_report(url, topic, group, fetch=12, ack=4)
            assert len(report["fetched"]) == 12 and len(report["acked"]) == 4
            assert report["attempts"] == [1] * 12
            unacked = set(ids(published)) - set(report["acked"])
            async with subscribed(transport, topic, group) as sub:
                seen = await drain(
                    sub, unacked, timeout=self.redelivery_timeout + self.delivery_timeout
                )
                dupes = {k: len(v) for k, v in seen.items() if len(v) != 1}
                assert not dupes, f"delivered more than once after the kill: {dupes}"
                if self.counts_crash_redeliveries(url):
                    for mid in set(report["fetched"]) - set(report["acked"]):
                        attempt = single(seen, mid).attempt
                        assert attempt >= 2, "redelivery after a crash not counted"
                for mid in unacked - set(report["fetched"]):
                    assert single(seen, mid).attempt == 1
                late = await sub.fetch(100, self.quiet_period)
                await sub.ack(late)
        return report, set(seen) | {d.message.id for d in late}

    async def test_killed_worker_deliveries_come_back(self, broker_url: str) -> None:
        """A worker process fetches 12 messages, acks 4 and is killed with SIGKILL: the 8 it
        held unacked come back to the group with ``attempt >= 2``, the 18 it never fetched
        arrive at attempt 1, each exactly once."""
        await self._kill_worker_mid_stream(broker_url)

    async def test_acks_survive_a_killed_worker(self, broker_url: str) -> None:
        """An ``ack`` that returned is durable: after the acking worker process is killed with
        SIGKILL, the group never sees those messages again ("this group will not see them
        again")."""
        report, delivered = await self._kill_worker_mid_stream(broker_url)
        back = sorted(set(report["acked"]) & delivered)
        assert not back, f"{len(back)} of 4 messages acked before the kill were delivered again"

    async def test_ack_holds_while_consumer_idles(self, broker_url: str) -> None:
        """An ack is final even if the acking consumer then stays idle past the visibility
        timeout: member A fetches two messages, acks one and idles; member B receives the
        other once A's lease expires, but never the acked one. Runs when the subclass
        configures a short lease (``lease_query``)."""
        if not self.lease_query:
            pytest.skip("no short visibility timeout configured (lease_query)")
        async with connected(self.redelivery_url(broker_url)) as transport:
            topic, group = unique_name("idle"), unique_name("g")
            published = make_messages(topic, 2)
            await self.create_groups(transport, topic, group)
            await transport.publish(topic, published)
            async with subscribed(transport, topic, group) as a:
                held = await drain(a, ids(published), timeout=self.delivery_timeout, ack=False)
                x, y = (single(held, m.id) for m in published)
                await a.ack([x])
                async with subscribed(transport, topic, group) as b:
                    seen = await drain(
                        b, [y.message.id], timeout=self.redelivery_timeout, max_messages=10
                    )
                    assert x.message.id not in seen, "acked message went to another member"
                    assert single(seen, y.message.id).attempt == 2
                    await expect_nothing(b, self.quiet_period)

    # -- 11/12. payloads and headers ------------------------------------------------------------

    async def test_binary_payloads_round_trip(self, transport: Transport) -> None:
        """Empty, all-256-byte-values, invalid UTF-8, random and 1 MiB (or ``max_payload``)
        payloads arrive byte for byte, as ``bytes``."""
        topic, group = unique_name("payload"), unique_name("g")
        big = MiB
        if transport.features.max_payload is not None:
            big = min(big, transport.features.max_payload)
        payloads = [
            b"",
            bytes(range(256)),
            bytes(range(255, -1, -1)) * 4,
            b"\xff\xfe\xc3\x28\xa0\xa1\xe2\x28\xa1\x00\x80",
            b"\x00" * 100,
            os.urandom(4096),
            os.urandom(big),
        ]
        payloads = [p for p in payloads if len(p) <= big]
        await self.create_groups(transport, topic, group)
        published = [Message(id=new_id(), topic=topic, payload=p, type="bin") for p in payloads]
        for m in published:  # one per publish: each must fit the engine's limit alone
            await transport.publish(topic, [m])
        async with subscribed(transport, topic, group) as sub:
            seen = await drain(sub, ids(published), timeout=self.delivery_timeout, max_messages=2)
            assert_exactly(seen, ids(published))
            for m in published:
                got = single(seen, m.id).message
                assert type(got.payload) is bytes
                assert len(got.payload) == len(m.payload)
                assert got.payload == m.payload, f"payload of {len(m.payload)} bytes changed"

    async def test_unicode_headers_and_keys_round_trip(self, transport: Transport) -> None:
        """Header names and values with accents, Cyrillic, CJK and emoji, an empty value,
        and non-ASCII message keys and types arrive unchanged."""
        topic, group = unique_name("unicode"), unique_name("g")
        headers = {
            "naïve-ключ": "значение ✓",
            "emoji-🎉": "🚀🔥 done",
            "中文键": "日本語の値、한국어",
            "empty": "",
            "spaces and = ; :": "a=b; c:d, \"quoted\" 'single'",
            CORRELATION_ID: new_id(),
            TRACEPARENT: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        }
        published = [
            Message(
                id=new_id(),
                topic=topic,
                key="ключ-🔑-键",
                type="Bestellung.Aufgegeben.Ü",
                payload="ünïcødé payload 🎉".encode(),
                headers=headers,
            ),
            Message(id=new_id(), topic=topic, key="日本", payload=b"x", headers={"ä": "ö"}),
        ]
        await self.create_groups(transport, topic, group)
        await transport.publish(topic, published)
        async with subscribed(transport, topic, group) as sub:
            seen = await drain(sub, ids(published), timeout=self.delivery_timeout)
            assert_exactly(seen, ids(published))
            for m in published:
                got = single(seen, m.id).message
                assert got.headers == m.headers
                assert got.key == m.key
                assert got.type == m.type
                assert got == as_published(m, topic)

    # -- 13. fetch timeouts and names -----------------------------------------------------------

    async def test_fetch_timeout_on_empty_topic(self, transport: Transport) -> None:
        """``fetch`` on an empty topic returns ``[]`` after about ``timeout`` seconds (not much
        earlier, not much later); ``timeout=0`` returns at once; a message published while a
        fetch waits is returned without waiting out the timeout; at most ``max_messages``."""
        topic, group = unique_name("empty"), unique_name("g")
        async with subscribed(transport, topic, group) as sub:
            timeout = 0.6
            started = time.monotonic()
            assert await sub.fetch(10, timeout) == []
            took = time.monotonic() - started
            assert timeout * 0.8 <= took <= timeout + 1.0, f"fetch({timeout}) took {took:.3f}s"

            started = time.monotonic()
            assert await sub.fetch(10, 0) == []
            took = time.monotonic() - started
            assert took <= 1.0, f"fetch(timeout=0) took {took:.3f}s"

            [m] = make_messages(topic, 1)

            async def publish_later() -> None:
                await anyio.sleep(0.2)
                await transport.publish(topic, [m])

            async with anyio.create_task_group() as tg:
                tg.start_soon(publish_later)
                started = time.monotonic()
                got = await sub.fetch(10, 5.0)
                took = time.monotonic() - started
            assert [d.message.id for d in got] == [m.id]
            assert took < 2.0, f"fetch waited {took:.3f}s for a message published after 0.2s"
            await sub.ack(got)

            more = make_messages(topic, 10)
            await transport.publish(topic, more)
            got = []
            with anyio.fail_after(self.delivery_timeout):
                while not got:
                    got = await sub.fetch(3, 0.25)
            assert 1 <= len(got) <= 3
            await sub.ack(got)
            rest = set(ids(more)) - {d.message.id for d in got}
            seen = await drain(sub, rest, timeout=self.delivery_timeout)
            assert_exactly(seen, rest)

    @pytest.mark.parametrize(
        "bad",
        ["", ".dot", "-dash", "sp ace", "sla/sh", "star*", "ünï", "x" * 201, "tab\t", "newline\n"],
    )
    async def test_invalid_names_raise_value_error(self, transport: Transport, bad: str) -> None:
        """Invalid topic or group names raise ``ValueError`` on publish and subscribe."""
        topic, group = unique_name("names"), unique_name("g")
        [m] = make_messages(topic, 1)
        with pytest.raises(ValueError):
            await transport.publish(bad, [m])
        with pytest.raises(ValueError):
            await transport.subscribe(bad, group)
        with pytest.raises(ValueError):
            await transport.subscribe(topic, bad)

    async def test_edge_valid_names_work(self, transport: Transport) -> None:
        """Names at the edges of the allowed set (``_`` start, dots, dashes, 200 characters)
        work for topics and groups."""
        suffix = uuid.uuid4().hex
        topics = [f"_{suffix}", f"A.b-c_9.{suffix}", f"t{suffix}".ljust(200, "x")]
        groups = [f"_g{suffix}", f"G.r-p_{suffix}", f"g{suffix}".ljust(200, "y")]
        for topic, group in zip(topics, groups, strict=True):
            published = make_messages(topic, 2)
            await self.create_groups(transport, topic, group)
            await transport.publish(topic, published)
            async with subscribed(transport, topic, group) as sub:
                seen = await drain(sub, ids(published), timeout=self.delivery_timeout)
                assert_exactly(seen, ids(published))

    async def test_close_is_idempotent(self, broker_url: str) -> None:
        """Closing a subscription twice, then the transport twice, raises nothing; a closed
        subscription's unacked delivery goes to the next member."""
        transport = open_transport(broker_url)
        await transport.connect()
        try:
            topic, group = unique_name("idem"), unique_name("g")
            published = make_messages(topic, 1)
            await self.create_groups(transport, topic, group)
            await transport.publish(topic, published)
            sub = await transport.subscribe(topic, group)
            await drain(sub, ids(published), timeout=self.delivery_timeout, ack=False)
            await sub.close()
            await sub.close()
            async with subscribed(transport, topic, group) as sub2:
                seen = await drain(sub2, ids(published), timeout=self.delivery_timeout)
                assert single(seen, published[0].id).attempt == 2
        finally:
            await transport.close()
        await transport.close()


async def _run_worker_until_report(
    url: str, topic: str, group: str, *, fetch: int, ack: int
) -> dict[str, Any]:
    """Start the worker process, read its report line, then SIGKILL it and reap it."""
    cmd = [sys.executable, "-m", "herald.testing._worker", url, topic, group, str(fetch), str(ack)]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, encoding="utf-8"
    )
    try:
        assert proc.stdout is not None
        stdout = proc.stdout
        with anyio.fail_after(60):
            line = await anyio.to_thread.run_sync(stdout.readline, abandon_on_cancel=True)
        if not line:
            _, err = proc.communicate(timeout=10)
            raise AssertionError(f"worker exited with {proc.returncode} before reporting:\n{err}")
        report: dict[str, Any] = json.loads(line)
        assert "error" not in report, report
        return report
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
