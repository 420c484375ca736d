"""What a Kafka cluster holds: Herald topics and their groups (:meth:`KafkaTransport.list_topics`).

Admin requests only (Metadata, ListGroups, OffsetFetch, DescribeGroups) and ListOffsets from a
consumer with no group: nothing is joined or committed. A group of a topic is a consumer group
with committed offsets on it; its ``lag`` is the log end minus the committed offset, summed over
the partitions (Tansu 0.6 reports the log end of a partition as its last batch's base offset + 1,
so there the lag can be too low).
"""

from __future__ import annotations

from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition  # type: ignore[import-untyped]
from aiokafka.admin import AIOKafkaAdminClient  # type: ignore[import-untyped]

from herald.transports.base import GroupInfo, TopicInfo

__all__ = ["groups", "topics"]


async def topics(admin: AIOKafkaAdminClient) -> list[TopicInfo]:
    """Every topic but Kafka's own (``__*``) and Herald's retry topics (``<topic>.<group>.retry``
    of a listed topic)."""
    names = {n for n in await admin.list_topics() if not n.startswith("__")}
    return [TopicInfo(n) for n in sorted(names) if not _is_retry_topic(n, names)]


def _is_retry_topic(name: str, names: set[str]) -> bool:
    if not name.endswith(".retry"):
        return False
    parts = name.split(".")
    return any(".".join(parts[:i]) in names for i in range(1, len(parts) - 1))


async def groups(
    admin: AIOKafkaAdminClient, consumer_options: dict[str, Any], topic: str
) -> list[GroupInfo]:
    """The consumer groups with committed offsets on ``topic`` (``[]`` if it does not exist)."""
    described = await admin.describe_topics([topic])
    if not described or described[0].get("error_code"):
        return []
    tps = [TopicPartition(topic, p["partition"]) for p in described[0]["partitions"]]
    committed: dict[str, dict[TopicPartition, int]] = {}
    for group_id, _ in await admin.list_consumer_groups():
        offsets = await admin.list_consumer_group_offsets(group_id, partitions=tps)
        mine = {tp: o.offset for tp, o in offsets.items() if o.offset >= 0}
        if mine:
            committed[group_id] = mine
    if not committed:
        return []
    consumer = AIOKafkaConsumer(group_id=None, enable_auto_commit=False, **consumer_options)
    await consumer.start()
    try:
        ends = await consumer.end_offsets(tps)
    finally:
        await consumer.stop()
    members: dict[str, int] = {}
    for group_id in sorted(committed):
        # one group per request: Tansu 0.6 and noida-db drop the connection when one
        # DescribeGroups request names several groups
        for response in await admin.describe_consumer_groups([group_id]):
            for group in response.groups:
                # (error_code, group, state, protocol_type, protocol, members, ...)
                members[group[1]] = len(group[5])
    # Kafka group ids carry the topic (``<group>:<topic>``, see kafka/groups.py): show the
    # Herald group name
    suffix = f":{topic}"
    return [
        GroupInfo(
            g.removesuffix(suffix),
            lag=sum(max(0, ends[tp] - off) for tp, off in committed[g].items()),
            consumers=members.get(g),
        )
        for g in sorted(committed)
    ]
