"""Watching a Kafka topic without joining it (:meth:`KafkaTransport.peek`).

A consumer with no ``group_id`` is assigned every partition of the topic and seeks each to
``end - last``: it never joins a consumer group and commits nothing, so no group's offsets or
assignments change. The ``last`` newest records of those read (by timestamp, across
partitions) are yielded, then every new one. Retry topics (``<topic>.<group>.retry``) are not
read: redeliveries are not shown.

Where the catch-up ends is the high watermark of the first fetch response, not the answer to
ListOffsets: Tansu 0.6 answers ListOffsets(latest) with the last batch's base offset + 1, which
would show the rest of that batch as new.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing, asynccontextmanager
from typing import Any, Protocol

import anyio
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition  # type: ignore[import-untyped]
from aiokafka.errors import KafkaError  # type: ignore[import-untyped]

from herald.message import Message
from herald.transports.base import TransportError
from herald.transports.kafka.wire import decode_record

__all__ = ["Source", "peek"]

_POLL_MS = 1000
_CATCH_UP = 30.0  # seconds: the longest the catch-up may take before new records are shown


class Source(Protocol):
    """What a peek needs of the transport."""

    @property
    def url(self) -> str: ...

    def consumer_options(self) -> dict[str, Any]: ...


@asynccontextmanager
async def peek(kafka: Source, topic: str, last: int) -> AsyncIterator[AsyncIterator[Message]]:
    """The ``last`` newest records of ``topic``, then each new one. A topic that does not exist
    is an error (nothing is created). On entering, every partition's position is fixed: what is
    published after that is shown."""
    consumer = AIOKafkaConsumer(group_id=None, enable_auto_commit=False, **kafka.consumer_options())
    try:
        await consumer.start()
        if topic not in await consumer.topics():
            raise TransportError(
                f"{kafka.url}: no topic {topic!r} (nothing has been published to it yet); "
                "peeking creates nothing"
            )
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic))]
        consumer.assign(tps)
        begins = await consumer.beginning_offsets(tps)
        ends = await consumer.end_offsets(tps)
        for tp in tps:
            consumer.seek(tp, max(begins[tp], ends[tp] - last))
        target, early = await _watermarks(consumer, tps)
        async with aclosing(_follow(consumer, tps, target, early, last)) as messages:
            yield messages
    except KafkaError as e:
        raise TransportError(f"{kafka.url}: cannot peek at {topic!r}: {e!r}") from None
    finally:
        with anyio.CancelScope(shield=True):
            await consumer.stop()


async def _watermarks(
    consumer: AIOKafkaConsumer, tps: list[TopicPartition]
) -> tuple[dict[TopicPartition, int], list[ConsumerRecord]]:
    """Fetch until every partition's high watermark is known: where the records that existed
    on entering end. Return those watermarks and the records fetched meanwhile."""
    target: dict[TopicPartition, int] = {}
    early: list[ConsumerRecord] = []
    deadline = time.monotonic() + _CATCH_UP
    while len(target) < len(tps) and time.monotonic() < deadline:
        batch = await consumer.getmany(timeout_ms=100)
        early += [r for records in batch.values() for r in records]
        for tp in tps:
            hw = consumer.highwater(tp)
            if tp not in target and hw is not None:
                target[tp] = hw
    for tp in tps:  # a partition that never answered: from where it was sought, all is new
        target.setdefault(tp, await consumer.position(tp))
    return target, early


async def _follow(
    consumer: AIOKafkaConsumer,
    tps: list[TopicPartition],
    target: dict[TopicPartition, int],
    early: list[ConsumerRecord],
    last: int,
) -> AsyncGenerator[Message, None]:
    backlog: list[ConsumerRecord] = []
    fresh: list[ConsumerRecord] = []

    def sort(records: list[ConsumerRecord]) -> None:
        for r in records:
            tp = TopicPartition(r.topic, r.partition)
            (backlog if r.offset < target[tp] else fresh).append(r)

    sort(early)
    deadline = time.monotonic() + _CATCH_UP
    while time.monotonic() < deadline:
        positions = [await consumer.position(tp) for tp in tps]
        if all(pos >= target[tp] for tp, pos in zip(tps, positions, strict=True)):
            break
        batch = await consumer.getmany(timeout_ms=200)
        sort([r for records in batch.values() for r in records])
    if last:
        for message in _in_order(backlog)[-last:]:
            yield message
    for message in _in_order(fresh):
        yield message
    while True:
        batch = await consumer.getmany(timeout_ms=_POLL_MS)
        for message in _in_order([r for rs in batch.values() for r in rs]):
            yield message


def _in_order(records: list[ConsumerRecord]) -> list[Message]:
    """The records' messages in publish order as far as it can be told across partitions: by
    timestamp, then by id (records of one batch share a timestamp; Herald's ids are UUIDv7,
    which grow within a process)."""
    decoded = []
    for r in records:
        message, _ = decode_record(r.topic, r.partition, r.offset, r.key, r.value, r.headers)
        decoded.append((r.timestamp, message.id, message))
    decoded.sort(key=lambda item: item[:2])
    return [m for _, _, m in decoded]
