"""Nack and redelivery; consumers leaving, joining and cancelled fetches losing nothing."""

from __future__ import annotations

import random
import time
from collections import Counter, defaultdict
from itertools import pairwise

import anyio
import pytest

from herald.message import Message
from herald.testing.conformance.suite import Suite
from herald.testing.helpers import (
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
from herald.transports import Transport


class RedeliveryTests(Suite):
    """Nack and redelivery; consumers leaving, joining and cancelled fetches losing nothing."""

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
