"""Fetch timeouts, name validation, idempotent close and reconnecting after close."""

from __future__ import annotations

import time
import uuid

import anyio
import pytest

from herald.testing.conformance.suite import Suite
from herald.testing.helpers import (
    assert_exactly,
    drain,
    ids,
    make_messages,
    single,
    subscribed,
    unique_name,
)
from herald.transports import Transport, open_transport


class NameTests(Suite):
    """Fetch timeouts, name validation and idempotent close."""

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

    async def test_connect_after_close(self, broker_url: str) -> None:
        """A closed transport connects again (an App restarts on it): a group that consumed
        before the close gets what is published after the reconnect, and only that."""
        transport = open_transport(broker_url)
        topic, group = unique_name("reopen"), unique_name("g")
        await transport.connect()
        try:
            for _ in range(2):
                published = make_messages(topic, 2)
                await self.create_groups(transport, topic, group)
                await transport.publish(topic, published)
                async with subscribed(transport, topic, group) as sub:
                    seen = await drain(sub, ids(published), timeout=self.delivery_timeout)
                    assert_exactly(seen, ids(published))
                await transport.close()
                await transport.connect()
        finally:
            await transport.close()
