"""Malformed messages written straight into the transport never take a worker down.

10,000 malformed messages (invalid JSON, wrong schema, empty, random bytes, a few of 5 MB)
interleaved with good ones: the worker stays up, every malformed message is in the dead letters
with a reason, every good one is handled.
"""

from __future__ import annotations

import random

import anyio
import pydantic
import pytest

from herald import App, Message, dead_letter_topic
from herald.dlq import tool_group
from herald.message import new_id
from herald.transports import Subscription

from .conftest import topic, wait_until

pytestmark = pytest.mark.anyio

MALFORMED = 10_000
GOOD = 2_000
BIG = 5 * 1024 * 1024


class Reading(pydantic.BaseModel):
    sensor: str
    celsius: float


def malformed(i: int, rng: random.Random, big: int) -> bytes:
    kind = i % 4
    if i % 2500 == 7:  # a few big payloads: 5 MB, or the most the broker takes
        return b"{" + b"x" * (big - 1)
    if kind == 0:
        return b'{"sensor": "s", "celsius": '  # truncated JSON
    if kind == 1:
        return b'{"sensor": 5, "celsius": "hot"}'  # wrong schema
    if kind == 2:
        return b""
    return rng.randbytes(rng.randint(1, 64)) + b"\xff"  # random bytes, never valid JSON


async def test_malformed_flood_is_dead_lettered_and_good_messages_handled(
    broker_url: str,
) -> None:
    t = topic()
    rng = random.Random(42)
    app = App("sensors", broker=broker_url)
    handled: set[str] = set()

    @app.subscriber(t, group="ingest")
    async def ingest(r: Reading) -> None:
        handled.add(r.sensor)

    bad_ids: set[str] = set()
    reasons: dict[str, int] = {}
    lettered: set[str] = set()

    async def read_dead_letters(sub: Subscription) -> None:
        # read as they come, as one operates a broker that bounds its queues (MQTT)
        with anyio.fail_after(240):
            while len(lettered) < MALFORMED:
                batch = await sub.fetch(1000, 1.0)
                for d in batch:
                    lettered.add(d.message.headers["dlq.original_id"])
                    reason = d.message.headers["dlq.reason"]
                    reasons[reason] = reasons.get(reason, 0) + 1
                    assert d.message.headers["dlq.error"]
                await sub.ack(batch)

    async with app:
        limit = app.transport.features.max_payload
        big = min(BIG, limit - 1024) if limit else BIG
        backlog = app.transport.features.max_backlog
        stats = app.consumers[0].stats
        dlq_topic = dead_letter_topic(t, "ingest")
        sub = await app.transport.subscribe(dlq_topic, tool_group(dlq_topic))
        async with anyio.create_task_group() as tg:
            tg.start_soon(read_dead_letters, sub)
            sent = 0
            for start in range(0, MALFORMED, 500):
                batch = []
                for i in range(start, start + 500):
                    payload = malformed(i, rng, big)
                    m = Message(id=new_id(), topic=t, payload=payload, type="Reading")
                    bad_ids.add(m.id)
                    batch.append(m)
                await app.transport.publish(t, batch)
                goods = [Reading(sensor=f"s{sent // 6 + k}", celsius=20.5) for k in range(100)]
                await app.publish_many(t, goods)
                sent += 600
                if backlog is not None:  # the broker drops what a consumer lags behind by more
                    await wait_until(
                        lambda n=sent, b=backlog: n - stats.handled - stats.dead_lettered < b // 2,
                        120,
                    )
            await wait_until(lambda: len(handled) == GOOD, timeout=120)
            await wait_until(lambda: stats.dead_lettered == MALFORMED, timeout=120)
        await sub.close()
        consumer = app.consumers[0]
    assert lettered == bad_ids
    assert reasons == {"undecodable payload": MALFORMED}
    assert handled == {f"s{i}" for i in range(GOOD)}
    assert consumer.stats.handled == GOOD
