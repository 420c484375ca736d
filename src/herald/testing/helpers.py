"""Helpers for transport tests: fresh names, message batches, bounded draining.

Used by the conformance suite and by each transport's own tests. Every wait is bounded: a
message that does not arrive fails the test with the ids that are missing.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Collection, Iterable
from contextlib import asynccontextmanager

import anyio

from herald.message import Message, new_id
from herald.transports import Delivery, Start, Subscription, Transport, open_transport

__all__ = [
    "MiB",
    "as_published",
    "assert_exactly",
    "connected",
    "drain",
    "expect_nothing",
    "ids",
    "make_messages",
    "single",
    "subscribed",
    "unique_name",
]

MiB = 1024 * 1024


def unique_name(prefix: str) -> str:
    """Return a topic/group name unique to this run: ``prefix`` plus a uuid suffix."""
    return f"{prefix}-{uuid.uuid4().hex[:16]}"


def make_messages(
    topic: str,
    count: int,
    *,
    key: str | None = None,
    type: str | None = "conformance.Event",
    prefix: str = "m",
) -> list[Message]:
    """Build ``count`` distinct messages for ``topic`` with fresh UUIDv7 ids and small payloads."""
    out = []
    for i in range(count):
        out.append(
            Message(
                id=new_id(),
                topic=topic,
                key=key,
                type=type,
                payload=f"{prefix}-{i}".encode(),
                headers={"seq": str(i)},
            )
        )
    return out


def ids(messages: Iterable[Message]) -> list[str]:
    """Return the ids of ``messages`` in order."""
    return [m.id for m in messages]


@asynccontextmanager
async def connected(url: str) -> AsyncIterator[Transport]:
    """Open and connect a transport for ``url``; close it on exit."""
    transport = open_transport(url)
    await transport.connect()
    try:
        yield transport
    finally:
        await transport.close()


@asynccontextmanager
async def subscribed(
    transport: Transport, topic: str, group: str, *, start: Start = "earliest"
) -> AsyncIterator[Subscription]:
    """Join ``group`` on ``topic``; close the subscription on exit."""
    sub = await transport.subscribe(topic, group, start=start)
    try:
        yield sub
    finally:
        await sub.close()


async def drain(
    sub: Subscription,
    expected: Collection[str],
    *,
    timeout: float,
    ack: bool = True,
    max_messages: int = 100,
    poll: float = 0.25,
) -> dict[str, list[Delivery]]:
    """Fetch (and by default ack) until every id in ``expected`` was delivered.

    Returns every delivery seen, by message id, including unexpected ones so callers can assert
    on them. Fails with the missing ids if ``timeout`` seconds pass first.
    """
    want = set(expected)
    seen: dict[str, list[Delivery]] = defaultdict(list)
    try:
        with anyio.fail_after(timeout):
            while not want.issubset(seen.keys()):
                batch = await sub.fetch(max_messages, poll)
                assert len(batch) <= max_messages, (
                    f"fetch({max_messages}) returned {len(batch)} deliveries"
                )
                for d in batch:
                    seen[d.message.id].append(d)
                if ack and batch:
                    await sub.ack(batch)
    except TimeoutError:
        missing = sorted(want - seen.keys())
        raise AssertionError(
            f"{len(missing)} of {len(want)} messages not delivered within {timeout}s on "
            f"topic {sub.topic!r} group {sub.group!r}; first missing: {missing[:3]}"
        ) from None
    return dict(seen)


async def expect_nothing(sub: Subscription, wait: float) -> None:
    """Assert that no delivery arrives on ``sub`` for ``wait`` seconds."""
    got = await sub.fetch(100, wait)
    assert got == [], f"unexpected deliveries on {sub.topic!r}/{sub.group!r}: {got}"


def single(seen: dict[str, list[Delivery]], message_id: str) -> Delivery:
    """Return the one delivery of ``message_id``, failing if there were several."""
    got = seen[message_id]
    assert len(got) == 1, f"message {message_id} delivered {len(got)} times: {got}"
    return got[0]


def assert_exactly(seen: dict[str, list[Delivery]], expected: Collection[str]) -> None:
    """Assert ``seen`` holds each id of ``expected`` exactly once and nothing else."""
    extra = sorted(seen.keys() - set(expected))
    assert not extra, f"{len(extra)} unexpected messages delivered, e.g. {extra[:3]}"
    dupes = {k: len(v) for k, v in seen.items() if len(v) != 1}
    assert not dupes, f"messages delivered more than once: {dupes}"


def as_published(message: Message, topic: str) -> Message:
    """What a delivered message must equal: the published one, with the publish topic."""
    return message.replace(topic=topic)


# --- the suite ----------------------------------------------------------------------------
