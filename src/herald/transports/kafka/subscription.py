"""A local subscription to a Kafka (topic, group): the :class:`Subscription` the transport
hands out. Several local subscriptions of one pair share one group member
(:class:`~herald.transports.kafka.member.GroupMember`) and compete for its records in memory.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import anyio

from herald.message import Message
from herald.transports.base import Delivery, Subscription, TransportError
from herald.transports.kafka.member import GroupMember

__all__ = ["KafkaSubscription"]


class KafkaSubscription(Subscription):
    """A local consumer of (topic, group); competes with the other local ones in memory."""

    def __init__(self, member: GroupMember) -> None:
        self.topic = member.topic
        self.group = member.group
        self._m = member
        self._inflight: set[Delivery] = set()
        self._closed = False

    async def fetch(self, max_messages: int, timeout: float) -> list[Delivery]:
        if max_messages < 1:
            raise ValueError("max_messages must be at least 1")
        deadline = time.monotonic() + timeout
        await anyio.lowlevel.checkpoint()  # a cancelled caller leaves before anything is claimed
        m = self._m
        while True:
            self._check_open()
            out = m.take(max_messages)
            if out:
                self._inflight.update(out)
                if m.transport.strict_attempts:
                    # the handout counts must be stored before a crash could follow
                    with anyio.CancelScope(shield=True):
                        await m.flush()
                return out
            now = time.monotonic()
            wait = deadline - now
            due = m.next_due()
            if due is not None:
                wait = min(wait, max(0.0, due - time.time()))
            if wait <= 0 and now >= deadline:
                return []
            await m.poll(max(0.0, wait))

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        if not deliveries:
            return
        mine = [d for d in deliveries if d in self._inflight]
        if mine:
            self._inflight.difference_update(mine)
            self._m.mark_acked(mine)
        # also when nothing is new: an ack retried after a failed commit must not return
        # before the commit it is waiting for went through (flush is a no-op if it did)
        await self._m.flush()

    async def commit(self, deliveries: Sequence[Delivery], messages: Sequence[Message]) -> None:
        self._check_open()
        mine = [d for d in deliveries if d in self._inflight]
        with anyio.CancelScope(shield=True):  # the outcome must reach the bookkeeping below
            await self._m.transact(mine, messages)
        self._inflight.difference_update(mine)

    async def nack(self, delivery: Delivery, delay: float = 0.0) -> None:
        if delivery not in self._inflight:
            return
        await self._m.nack(delivery, delay)
        self._inflight.discard(delivery)

    def _check_open(self) -> None:
        if self._closed or self._m.closed:
            raise TransportError(f"subscription to {self.topic!r} (group {self.group!r}) is closed")

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        held, self._inflight = list(self._inflight), set()
        await self._m.transport.release(self._m, self, held)
