"""What hangs off a topic, recorded on the broker so that any process can delete it.

AMQP cannot list queues (only the management plugin can), so :meth:`delete_topic` would only
know the group and delay queues its own process declared. Instead every transport records the
groups and delay queues it creates in the topic's *registry*: a durable queue
``<topic>::registry`` (a name no group or delay queue can take: a group name is never empty)
holding JSON bodies ``{"groups": [...], "queues": [...]}``. The union of its messages is
what the topic has.

Recording (:func:`take` then a publish of the union, then an ack of what was taken) keeps the
queue compact: usually one message. Two processes recording at once each publish their own
union of what they took and what they add, and only ack what they took, so no name is ever
dropped: the registry may briefly hold two messages, never less than everything.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import aiormq
from pamqp.commands import Basic

from herald.transports.rabbitmq.wire import fit

__all__ = ["Entries", "registry_queue", "take"]


def registry_queue(topic: str) -> str:
    """The registry queue of ``topic``."""
    return fit(f"{topic}::registry")


@dataclass
class Entries:
    """Group names and extra queue names (delay queues) recorded for a topic."""

    groups: set[str] = field(default_factory=set)
    queues: set[str] = field(default_factory=set)

    def covers(self, other: Entries) -> bool:
        return other.groups <= self.groups and other.queues <= self.queues

    def merge(self, other: Entries) -> None:
        self.groups |= other.groups
        self.queues |= other.queues

    def encode(self) -> bytes:
        return json.dumps({"groups": sorted(self.groups), "queues": sorted(self.queues)}).encode()

    @classmethod
    def decode(cls, body: bytes) -> Entries:
        """The entries of one registry message; a body that is not a registry entry (someone
        else's message) yields none rather than an error."""
        try:
            data = json.loads(body)
        except ValueError:
            return cls()
        if not isinstance(data, dict):
            return cls()
        return cls(_names(data.get("groups")), _names(data.get("queues")))


def _names(value: object) -> set[str]:
    if not isinstance(value, list):
        return set()
    return {v for v in value if isinstance(v, str)}


async def take(ch: aiormq.abc.AbstractChannel, queue: str) -> tuple[Entries, int | None]:
    """Get every message of the registry ``queue`` (declaring it), unacked: their merged
    entries and the last delivery tag (``None`` if the registry was empty). The caller acks
    (``multiple``) or requeues them."""
    await ch.queue_declare(queue, durable=True, arguments={"x-queue-type": "classic"})
    entries = Entries()
    last: int | None = None
    while True:
        got = await ch.basic_get(queue, no_ack=False)
        if not isinstance(got.delivery, Basic.GetOk):
            return entries, last
        entries.merge(Entries.decode(got.body))
        last = got.delivery.delivery_tag
