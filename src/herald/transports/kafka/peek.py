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
from collections.abc import AsyncIterator
from typing import Any, Protocol

import anyio
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition  # type: ignore[import-untyped]
from aiokafka.errors import KafkaError  # type: ignore[import-untyped]

from herald.message import Message
from herald.transports.base import TransportError
from herald.transports.kafka.wire import decode_record

__all__ = ["Source", "follow"]

_POLL_MS = 1000
_CATCH_UP = 30.0  # seconds: the longest the catch-up may take before new records are shown


class Source(Protocol):
    """What a peek needs of the transport."""

    @property
    def url(self) -> str: ...

    def consumer_options(self) -> dict[str, Any]: ...


async def follow(kafka: Source, topic: str, last: int) -> AsyncIterator[Message]:
    """The ``last`` newest records of ``topic``, then each new one. A topic that does not exist
    is an error (nothing is created)."""
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
        backlog, fresh = await _catch_up(consumer, tps)
        for message in _in_order(backlog)[len(backlog) - last :] if last else ():
            yield message
        for message in _in_order(fresh):
            yield message
        while True:
            batch = await consumer.getmany(timeout_ms=_POLL_MS)
            for message in _in_order([r for rs in batch.values() for r in rs]):
                yield message
    except KafkaError as e:
        raise TransportError(f"{kafka.url}: cannot peek at {topic!r}: {e!r}") from None
    finally:
        with anyio.CancelScope(shield=True):
            await consumer.stop()


async def _catch_up(
    consumer: AIOKafkaConsumer, tps: list[TopicPartition]
) -> tuple[list[ConsumerRecord], list[ConsumerRecord]]:
    """Read up to each partition's high watermark as the first fetch response gave it:
    return (records before it, records at or after it)."""
    target: dict[TopicPartition, int] = {}
    backlog: list[ConsumerRecord] = []
    fresh: list[ConsumerRecord] = []
    deadline = time.monotonic() + _CATCH_UP
    while time.monotonic() < deadline:
        batch = await consumer.getmany(timeout_ms=200)
        for tp in tps:
            if tp not in target and consumer.highwater(tp) is not None:
                target[tp] = consumer.highwater(tp)
        for tp, records in batch.items():
            end = target.get(tp)
            for r in records:
                (backlog if end is None or r.offset < end else fresh).append(r)
        if len(target) == len(tps):
            positions = [await consumer.position(tp) for tp in tps]
            if all(pos >= target[tp] for tp, pos in zip(tps, positions, strict=True)):
                break
    return backlog, fresh


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
