"""What a NATS server holds: Herald topics and their groups (:meth:`NatsTransport.list_topics`).

A Herald topic is a stream named like it (``.`` as ``~``) capturing exactly its subject; a
group is a durable consumer on it (ephemeral ones, such as a running peek, are left out).
Read-only JetStream API calls (``STREAM.LIST``, ``CONSUMER.LIST``), paged.
"""

from __future__ import annotations

import nats.js.errors
from nats.js.manager import JetStreamManager

from herald.transports.base import GroupInfo, TopicInfo
from herald.transports.nats.wire import stream_name, subject_for

__all__ = ["groups", "topics"]


def _topic_of(stream: str) -> str:
    return stream.replace("~", ".")  # the inverse of stream_name (and of consumer_name)


async def topics(jsm: JetStreamManager) -> list[TopicInfo]:
    """Every stream that is a Herald topic's, with its message count."""
    out: list[TopicInfo] = []
    seen = 0
    while True:
        page = await jsm.streams_info(offset=seen)
        seen += len(page)
        for info in page:
            name = info.config.name or ""
            topic = _topic_of(name)
            if info.config.subjects == [subject_for(topic)] and stream_name(topic) == name:
                out.append(TopicInfo(topic, messages=info.state.messages))
        if len(page) < 256:  # the server's page size: a short page is the last
            break
    return sorted(out, key=lambda t: t.name)


async def groups(jsm: JetStreamManager, topic: str) -> list[GroupInfo]:
    """The durable consumers of ``topic``'s stream: ``lag`` = messages not delivered yet,
    ``pending`` = delivered and not acked."""
    stream = stream_name(topic)
    out: list[GroupInfo] = []
    seen = 0
    while True:
        try:
            page = await jsm.consumers_info(stream, offset=seen)
        except nats.js.errors.NotFoundError:
            return []
        seen += len(page)
        for info in page:
            if info.config.durable_name:
                out.append(
                    GroupInfo(
                        _topic_of(info.name),
                        lag=info.num_pending,
                        pending=info.num_ack_pending,
                    )
                )
        if len(page) < 256:
            break
    return sorted(out, key=lambda g: g.name)
