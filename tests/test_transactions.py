"""Transactional subscribers (``transactional=True``): a handler's publishes and its ack commit
together. On every transport (``broker_url``): where the transport has transactions the
outputs of a handled message appear exactly once, a failed attempt's publishes never; where it
has none (or the broker refuses them) the app does not start, with a clear error. Kafka's
real transactions on noida-db (aborts invisible to read_committed readers) are in
``test_kafka_transactions.py``."""

from __future__ import annotations

from collections import Counter

import anyio
import pydantic
import pytest

from herald import App, Context, Retry
from herald.testing.helpers import connected, subscribed
from herald.transports import TransportError
from herald.transports.base import Delivery

from .conftest import topic, wait_until

pytestmark = pytest.mark.anyio


class Job(pydantic.BaseModel):
    n: int


async def _has_transactions(url: str) -> bool:
    """Whether the transport and its broker grant transactions (Tansu, on 9092, does not)."""
    async with connected(url) as t:
        return t.features.transactions and "127.0.0.1:9092" not in url


async def test_transactional_outputs_appear_exactly_once(broker_url: str) -> None:
    t_in, t_out = topic(), topic()
    app = App("tx", broker=broker_url)
    calls: Counter[int] = Counter()
    out: list[int] = []

    # 2 fails once (retried in-process), 3 fails twice (in-process, then redelivered)
    retry = Retry(attempts=2, delay=0.01, redelivery_delay=0.05)

    @app.subscriber(t_in, group="g", transactional=True, retry=retry)
    async def handle(e: Job, ctx: Context) -> None:
        calls[e.n] += 1
        await ctx.publish(t_out, Job(n=e.n * 10))
        await ctx.publish(t_out, Job(n=e.n * 10 + 1))
        if calls[e.n] < e.n:
            raise RuntimeError("fails after publishing: these two must never go out")

    @app.subscriber(t_out, group="reader")
    async def read(e: Job) -> None:
        out.append(e.n)

    if not await _has_transactions(broker_url):
        with pytest.raises((ValueError, TransportError), match="transaction"):
            async with app:
                pass
        return
    async with app:
        for n in (1, 2, 3):
            await app.publish(t_in, Job(n=n))
        await wait_until(lambda: len(out) >= 6, timeout=30)
        await anyio.sleep(0.3)  # anything extra would show up now
    assert sorted(out) == [10, 11, 20, 21, 30, 31]
    assert calls == {1: 1, 2: 2, 3: 3}


async def test_publisher_return_value_is_part_of_the_transaction(broker_url: str) -> None:
    if not await _has_transactions(broker_url):
        pytest.skip("no transactions on this transport (the refusal is tested above)")
    t_in, t_out = topic(), topic()
    app = App("tx", broker=broker_url)
    out: list[int] = []

    @app.subscriber(t_in, group="g", transactional=True)
    @app.publisher(t_out)
    async def double(e: Job) -> Job:
        return Job(n=e.n * 2)

    @app.subscriber(t_out, group="reader")
    async def read(e: Job) -> None:
        out.append(e.n)

    async with app:
        await app.publish_many(t_in, [Job(n=n) for n in range(50)])
        await wait_until(lambda: len(out) >= 50, timeout=30)
    assert sorted(out) == [n * 2 for n in range(50)]


async def test_failed_commit_publishes_nothing_and_keeps_the_delivery(broker_url: str) -> None:
    """Transport level: a commit that cannot complete (a message with an invalid topic name)
    raises, publishes none of its messages, and leaves the delivery unacked."""
    if not await _has_transactions(broker_url):
        pytest.skip("no transactions on this transport")
    t_in, t_out = topic(), topic()
    async with connected(broker_url) as transport:
        app = App("tx", broker=broker_url)  # only to build envelopes
        good = app.message(t_out, Job(n=1))
        bad = good.replace(topic="no spaces allowed", id=good.id + "x")
        async with subscribed(transport, t_out, "reader") as reader:
            await transport.publish(t_in, [app.message(t_in, Job(n=0))])
            async with subscribed(transport, t_in, "g") as sub:
                got: list[Delivery] = []
                with anyio.fail_after(30):
                    while not got:
                        got = await sub.fetch(1, 0.5)
                with pytest.raises(ValueError, match="topic"):
                    await sub.commit(got, [good, bad])
                await sub.commit(got, [])  # still unacked, so it can be committed now
            assert await reader.fetch(10, 1.0) == []
