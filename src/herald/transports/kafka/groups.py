"""Herald groups as Kafka consumer groups: one Kafka group per (group, topic).

A Herald group on a topic is an independent subscription: its members, its position, its
rebalances concern that topic only. So its Kafka consumer group id carries the topic:
``<group>:<topic>`` (``:`` never occurs in a Herald name, so no two pairs share an id).

Why not the bare group name, as a plain Kafka client would use? Kafka rebalances a consumer
group as a whole, and aiokafka does it *eagerly*: every member gives up all its partitions and
rejoins. With one Kafka group per Herald group, a service consuming ``orders`` and
``payments`` as ``billing`` had one group spanning both topics: a worker joining or leaving
``orders``, or one crashing on it (the group then waits up to the session timeout for it),
stopped ``payments`` too until the whole group had rebalanced, and a slow join on one topic
(``join_timeout``) held back every other. Per-topic ids keep each topic's rebalances to
itself, at the cost of more (small) groups on the broker and ids that are not the bare group
name in Kafka's tools (``kafka-consumer-groups --group billing:orders``). The group id goes
first so a prefixed ACL on ``billing:`` grants a service all of its groups.

Migration: a Herald before this change committed under the bare group name. When a
partition has no committed offset under the new id, the member looks up the offset (and its
metadata: handout counts, acks above it) committed under the bare name and starts there,
committing it under the new id; that lookup never joins the old group, so old workers still
running are not disturbed. Upgrading is therefore transparent. Stop the old workers before
starting new ones: while both run, both groups consume (duplicates, not losses). To start a
group afresh instead, commit offsets for the new id first (or delete the old group).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import anyio
from aiokafka import AIOKafkaConsumer, TopicPartition  # type: ignore[import-untyped]
from aiokafka.errors import KafkaError  # type: ignore[import-untyped]
from aiokafka.structs import OffsetAndMetadata  # type: ignore[import-untyped]

__all__ = ["abandon_join", "committed_offsets", "group_id", "legacy_offsets"]

log = logging.getLogger("herald.transports.kafka")

#: seconds the look-up of a legacy group's offsets may take before it is given up
_LEGACY_TIMEOUT = 10.0


def group_id(group: str, topic: str) -> str:
    """The Kafka consumer group id of Herald ``group`` on ``topic``."""
    return f"{group}:{topic}"


async def committed_offsets(
    consumer: AIOKafkaConsumer, tps: list[TopicPartition]
) -> dict[TopicPartition, Any]:
    """Committed offsets *with* their metadata for ``consumer``'s group. aiokafka's public
    ``committed()`` returns only the offset; the coordinator call it wraps returns both."""
    coordinator = getattr(consumer, "_coordinator", None)
    fetch = getattr(coordinator, "fetch_committed_offsets", None)
    if fetch is not None:
        result: dict[TopicPartition, Any] = await fetch(tps)
        return result
    out: dict[TopicPartition, Any] = {}
    for tp in tps:  # pragma: no cover - fallback for an aiokafka without it
        off = await consumer.committed(tp)
        if off is not None:
            out[tp] = OffsetAndMetadata(off, "")
    return out


async def legacy_offsets(
    options: dict[str, Any],
    group: str,
    fresh: list[TopicPartition],
    committed: dict[TopicPartition, Any],
) -> dict[TopicPartition, Any]:
    """For the ``fresh`` partitions that ``committed`` (the new group id's offsets) has no
    offset for: what a Herald that used the bare group name committed. A group client that
    never subscribes reads them without joining that group. Best effort: on an error or past
    a time limit it logs a warning and returns nothing. ``options``: the transport's consumer
    options."""
    tps = [tp for tp in fresh if committed.get(tp) is None or committed[tp].offset < 0]
    if not tps:
        return {}
    consumer = AIOKafkaConsumer(group_id=group, enable_auto_commit=False, **options)
    try:
        with anyio.fail_after(_LEGACY_TIMEOUT):
            await consumer.start()
            found = await committed_offsets(consumer, tps)
    except (KafkaError, TimeoutError) as e:
        log.warning("group %s: cannot read the offsets committed under its old id: %r", group, e)
        return {}
    finally:
        with anyio.CancelScope(shield=True):
            await consumer.stop()
    adopted = {tp: om for tp, om in found.items() if om is not None and om.offset >= 0}
    if adopted:
        log.info(
            "group %s: starting where its old Kafka group id %r committed: %s",
            group,
            group,
            ", ".join(f"{tp.topic}[{tp.partition}]@{om.offset}" for tp, om in adopted.items()),
        )
    return adopted


async def abandon_join(consumer: AIOKafkaConsumer) -> None:
    """End a join still under way, so ``stop()`` returns at once. aiokafka's ``stop()`` first
    lets the coordination task finish its pending work, which includes a JoinGroup the broker
    may hold for up to the rebalance timeout (Tansu holds every join for half the session
    timeout); a worker told to stop while joining would wait that long. Nothing is lost: the
    member has no partitions yet, and the broker forgets the pending join at session timeout."""
    coordinator = getattr(consumer, "_coordinator", None)
    task = getattr(coordinator, "_coordination_task", None)
    if isinstance(task, asyncio.Task) and not task.done():
        task.cancel()
        await asyncio.wait([task])  # finished, its CancelledError not re-raised here
