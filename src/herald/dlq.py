"""Dead-letter tooling: look at, replay and purge a group's dead letters.

``DeadLetters(broker, "orders.billing.dlq")`` works on one dead-letter topic (see
:func:`herald.dead_letter_topic`), or on a skipped topic ``<topic>.<group>.skipped``; any other
topic is refused (``herald tail`` watches an ordinary topic without joining it). It reads
through a consumer group of its own on that topic, :func:`~herald.middleware.deadletter.tool_group`
(``herald.dlq.<digest>``), which no application group shares:

* :meth:`DeadLetters.list` / :meth:`DeadLetters.show` *peek*: they fetch and then hand the
  messages back unacked, so nothing changes.
* :meth:`DeadLetters.replay` publishes each chosen dead letter back to its original topic —
  payload, key, type and original headers as they were, a new id, plus ``replay_group`` naming
  the group that failed it, so the other groups of that topic (which handled it fine) skip it —
  then acks it off the dead-letter topic. A replay that fails again is dead-lettered again.
* :meth:`DeadLetters.purge` acks chosen dead letters without replaying them.

Dead letters not chosen by ``where`` stay where they are.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from types import TracebackType

from herald.message import Message, new_id
from herald.middleware.deadletter import (
    REPLAY_GROUP,
    TOOL_GROUP,
    is_dead_letter_topic,
    tool_group,
)
from herald.transports import Transport, open_transport, validate_name
from herald.transports.base import Delivery, Subscription

__all__ = ["REPLAY_GROUP", "TOOL_GROUP", "DeadLetters", "origin", "tool_group"]

# REPLAY_GROUP, TOOL_GROUP and tool_group live with the dead-letter naming (the consumer needs
# them and must not import this tool); re-exported here for the tool's users.

Where = Callable[[Message], bool]
Progress = Callable[[int], None]

_FETCH = 256
_QUIET = 0.3  # seconds without a delivery that mean "no more dead letters for now"


class DeadLetters:
    """One dead-letter topic on one broker. Use as ``async with DeadLetters(...) as dlq:``."""

    def __init__(self, broker: str | Transport, topic: str) -> None:
        """Raises ``ValueError`` for a topic that is not a dead-letter or skipped topic: the
        tooling's group would otherwise keep a copy of every message of an ordinary topic
        (and, on RabbitMQ, take the messages parked for its first group)."""
        self.topic = validate_name("topic", topic)
        if not is_dead_letter_topic(topic):
            raise ValueError(
                f"{topic!r} is not a dead-letter topic (<topic>.<group>.dlq) or skipped topic "
                f"(<topic>.<group>.skipped); to watch an ordinary topic without joining it, "
                f"use `herald tail {topic}`"
            )
        self._own = isinstance(broker, str)
        self._transport = open_transport(broker) if isinstance(broker, str) else broker

    async def __aenter__(self) -> DeadLetters:
        if self._own:
            await self._transport.connect()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._own:
            await self._transport.close()

    async def list(self, limit: int = 100, where: Where | None = None) -> list[Message]:
        """Up to ``limit`` dead letters (matching ``where``), oldest first. Changes nothing."""
        out: list[Message] = []
        sub = await self._subscribe()
        try:
            async for d in _drain(sub):
                if where is None or where(d.message):
                    out.append(d.message)
                    if len(out) >= limit:
                        break
        finally:
            await sub.close()  # hands everything back
        return out

    async def show(self, message_id: str) -> Message | None:
        """The dead letter with this id, or whose original message had it."""
        found = await self.list(
            limit=1,
            where=lambda m: message_id in (m.id, origin(m)[0]),
        )
        return found[0] if found else None

    async def replay(
        self, limit: int | None = None, where: Where | None = None, progress: Progress | None = None
    ) -> int:
        """Publish chosen dead letters back to their original topics; return how many."""

        async def act(d: Delivery) -> None:
            m = d.message
            _, original, group = origin(m)
            if not original or not group:
                raise ValueError(
                    f"{m.id} on {self.topic} says neither its original topic nor its group "
                    "(no dlq.original_topic/dlq.group or skipped.original_topic/skipped.group)"
                )
            await self._transport.publish(original, [replay_of(m, original, group)])

        return await self._each(act, limit, where, progress)

    async def purge(
        self, limit: int | None = None, where: Where | None = None, progress: Progress | None = None
    ) -> int:
        """Remove chosen dead letters for good; return how many."""

        async def act(d: Delivery) -> None:
            return None

        return await self._each(act, limit, where, progress)

    async def _each(
        self,
        act: Callable[[Delivery], Awaitable[None]],
        limit: int | None,
        where: Where | None,
        progress: Progress | None,
    ) -> int:
        done = 0
        sub = await self._subscribe()
        try:
            async for d in _drain(sub):
                if limit is not None and done >= limit:
                    break
                if where is not None and not where(d.message):
                    continue
                await act(d)
                await sub.ack([d])  # one by one: an interruption never acks what was not done
                done += 1
                if progress is not None:
                    progress(done)
        finally:
            await sub.close()
        return done

    async def _subscribe(self) -> Subscription:
        return await self._transport.subscribe(self.topic, tool_group(self.topic), start="earliest")


async def _drain(sub: Subscription) -> AsyncIterator[Delivery]:
    """Every delivery currently available, until the topic stays quiet for a moment."""
    while True:
        batch = await sub.fetch(_FETCH, _QUIET)
        if not batch:
            return
        for d in batch:
            yield d


def origin(letter: Message) -> tuple[str, str | None, str | None]:
    """``(original id, original topic, group)`` of a dead letter or a skipped message, read
    from its ``dlq.*`` or ``skipped.*`` headers (``None`` where missing)."""
    h = letter.headers
    for prefix in ("dlq.", "skipped."):
        if f"{prefix}original_id" in h:
            return (
                h[f"{prefix}original_id"],
                h.get(f"{prefix}original_topic"),
                h.get(f"{prefix}group"),
            )
    return letter.id, None, None


def replay_of(letter: Message, topic: str, group: str) -> Message:
    """The message a dead letter is replayed as: the original, addressed to ``group`` only."""
    headers = {k: v for k, v in letter.headers.items() if not k.startswith(("dlq.", "skipped."))}
    headers[REPLAY_GROUP] = group
    headers["replayed_from"] = origin(letter)[0]
    return Message(
        id=new_id(),
        topic=topic,
        payload=letter.payload,
        key=letter.key,
        type=letter.type,
        headers=headers,
    )
