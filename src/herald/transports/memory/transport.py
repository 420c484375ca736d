"""The in-process transport: ``memory://`` (private bus) or ``memory://NAME`` (shared by name).

This is both the test double and the production in-process message bus. It keeps the same
group semantics as the durable transports — competing consumers within a group, fan-out across
groups, redelivery on nack and on close, delayed redelivery — but nothing survives the process.

``memory://`` gives each transport object its own bus. ``memory://orders`` gives every transport
opened with that URL in this process the same bus, so several Apps in one process can talk.

A topic is an append-only list with an absolute offset; each group has a cursor into it plus a
queue of deliveries to hand out again (nacked, or left unacked by a closed consumer). The prefix
every group has read is trimmed. A topic no group has joined keeps everything, so a group that
starts at ``"earliest"`` later still sees it.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from contextlib import aclosing, asynccontextmanager
from typing import ClassVar

import anyio

from herald.message import Message
from herald.transports.base import (
    Delivery,
    Features,
    GroupInfo,
    Start,
    Subscription,
    TopicInfo,
    Transport,
    TransportError,
    by_topic,
    check_peek,
    check_topology,
    unsupported,
    validate_name,
)

__all__ = ["MemoryTransport"]

_TRIM_AT = 4096  # trim a topic's log once this many messages are behind every group's cursor
_CHECK_CLOSED = 0.5  # how often a waiting peek looks whether its transport was closed


class _Group:
    __slots__ = ("cursor", "delayed", "ready")

    def __init__(self, cursor: int) -> None:
        self.cursor = cursor
        # (message, attempt) pairs to hand out before new messages
        self.ready: deque[tuple[Message, int]] = deque()
        # heap of (visible_at, tiebreak, message, attempt)
        self.delayed: list[tuple[float, int, Message, int]] = []


class _Topic:
    __slots__ = ("base", "changed", "groups", "log")

    def __init__(self) -> None:
        self.log: list[Message] = []
        self.base = 0  # absolute offset of log[0]
        self.groups: dict[str, _Group] = {}
        self.changed = anyio.Event()

    def notify(self) -> None:
        self.changed.set()
        self.changed = anyio.Event()

    def lag(self, g: _Group) -> int:
        """Messages not handed to group ``g`` yet, plus its redeliveries waiting."""
        return self.base + len(self.log) - g.cursor + len(g.ready) + len(g.delayed)

    def trim(self) -> None:
        if not self.groups:
            return
        low = min(g.cursor for g in self.groups.values())
        drop = low - self.base
        if drop >= _TRIM_AT:
            del self.log[:drop]
            self.base = low


class _Bus:
    """The shared state of one bus: topics by name."""

    def __init__(self) -> None:
        self.topics: dict[str, _Topic] = {}

    def topic(self, name: str) -> _Topic:
        t = self.topics.get(name)
        if t is None:
            t = self.topics[name] = _Topic()
        return t


_named_buses: dict[str, _Bus] = {}


def _handout_order(d: Delivery) -> str:
    return d.message.id  # ids are time-ordered: roughly publish order


_tiebreak = itertools.count()


class MemorySubscription(Subscription):
    """One consumer of a group on a memory bus."""

    def __init__(
        self, owner: MemoryTransport, topic: _Topic, group: _Group, names: tuple[str, str]
    ):
        self.topic, self.group = names
        self._owner = owner
        self._t = topic
        self._g = group
        # handed out, not yet acked or nacked; keyed by the Delivery object itself
        self._inflight: set[Delivery] = set()
        self._closed = False

    async def fetch(self, max_messages: int, timeout: float) -> list[Delivery]:
        if max_messages < 1:
            raise ValueError("max_messages must be at least 1")
        deadline = time.monotonic() + timeout
        # Yield once *before* claiming: a hot bus stays fair to other tasks, and a cancellation
        # lands while nothing is claimed yet. From _take to return there is no await.
        await anyio.lowlevel.checkpoint()
        while True:
            self._check_open()
            out = self._take(max_messages)
            if out:
                return out
            now = time.monotonic()
            wait = deadline - now
            if self._g.delayed:
                wait = min(wait, self._g.delayed[0][0] - now)
            if wait <= 0:
                if now >= deadline:
                    return []
                continue
            changed = self._t.changed
            with anyio.move_on_after(wait):
                await changed.wait()

    def _take(self, n: int) -> list[Delivery]:
        g = self._g
        out: list[Delivery] = []
        if g.delayed:
            now = time.monotonic()
            while g.delayed and g.delayed[0][0] <= now and len(out) < n:
                _, _, msg, attempt = heapq.heappop(g.delayed)
                out.append(Delivery(msg, attempt, None))
        while g.ready and len(out) < n:
            msg, attempt = g.ready.popleft()
            out.append(Delivery(msg, attempt, None))
        want = n - len(out)
        if want > 0:
            t = self._t
            start = g.cursor - t.base
            batch = t.log[start : start + want]
            if batch:
                g.cursor += len(batch)
                out += [Delivery(msg, 1, None) for msg in batch]
                if g.cursor - t.base >= _TRIM_AT:
                    t.trim()
        self._inflight.update(out)
        return out

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        # acking twice, or after close, is harmless
        self._inflight.difference_update(deliveries)

    async def commit(self, deliveries: Sequence[Delivery], messages: Sequence[Message]) -> None:
        """Publish and ack with no await in between: atomic within the process."""
        self._check_open()
        batches = by_topic(messages)  # every name checked before anything is published
        for topic, batch in batches.items():
            await self._owner.publish(topic, batch)  # never suspends
        await self.ack(deliveries)  # nor does this

    async def nack(self, delivery: Delivery, delay: float = 0.0) -> None:
        if delivery not in self._inflight:
            return  # already acked/nacked, or handed back by close()
        self._inflight.discard(delivery)
        msg, attempt = delivery.message, delivery.attempt
        if delay > 0:
            visible = time.monotonic() + delay
            heapq.heappush(self._g.delayed, (visible, next(_tiebreak), msg, attempt + 1))
        else:
            self._g.ready.append((msg, attempt + 1))
        self._t.notify()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._owner._subs.discard(self)
        if self._inflight:
            # unacked deliveries go back to the group at once, in publish order (ids are
            # time-ordered); like a crashed consumer's, they count as a further attempt
            for d in sorted(self._inflight, key=_handout_order):
                self._g.ready.append((d.message, d.attempt + 1))
            self._inflight.clear()
            self._t.notify()

    def _check_open(self) -> None:
        if self._closed:
            raise TransportError(f"subscription to {self.topic!r} (group {self.group!r}) is closed")


class MemoryTransport(Transport):
    """In-process bus. Not persistent; groups live as long as the bus."""

    schemes: ClassVar[tuple[str, ...]] = ("memory",)
    features = Features(
        persistent=False,
        cross_process=False,
        ordered_per_key=True,
        native_delay=True,
        replay=True,
        transactions=True,
        listing=True,
    )

    def __init__(self, name: str = "") -> None:
        self._name = name
        self._bus: _Bus | None = None
        self._subs: set[MemorySubscription] = set()

    @classmethod
    def from_url(cls, url: str) -> MemoryTransport:
        scheme, sep, rest = url.partition("://")
        if scheme.lower() != "memory" or not sep:
            raise ValueError(f"not a memory URL: {url!r} (expected memory:// or memory://NAME)")
        name = rest.strip("/")
        if name and ("/" in name or "?" in name):
            raise ValueError(f"memory URL takes only a bus name, got {url!r}")
        return cls(name)

    @property
    def url(self) -> str:
        return f"memory://{self._name}"

    async def connect(self) -> None:
        if self._bus is not None:
            return
        if self._name:
            self._bus = _named_buses.setdefault(self._name, _Bus())
        else:
            self._bus = _Bus()

    async def close(self) -> None:
        for sub in list(self._subs):
            await sub.close()
        self._bus = None

    def _require_bus(self) -> _Bus:
        if self._bus is None:
            raise TransportError(f"{self.url} is not connected: call connect() or use 'async with'")
        return self._bus

    async def publish(self, topic: str, messages: Sequence[Message]) -> None:
        bus = self._require_bus()
        t = bus.topics.get(topic)
        if t is None:
            validate_name("topic", topic)
            t = bus.topic(topic)
        log = t.log
        for m in messages:
            log.append(m if m.topic == topic else m.replace(topic=topic))
        t.notify()

    async def subscribe(
        self,
        topic: str,
        group: str,
        *,
        start: Start = "earliest",
        bind: Sequence[str] = (),
        source: str | None = None,
    ) -> Subscription:
        """Join ``group`` on ``topic``. ``bind`` and ``source`` raise ``ValueError``: the bus
        has no routing addresses and no objects besides its topics."""
        bus = self._require_bus()
        validate_name("topic", topic)
        validate_name("group", group)
        bind, source = check_topology(bind, source)
        if bind:
            raise unsupported(
                "memory", "bind", "the in-process bus has no routing keys; use filter="
            )
        if source is not None:
            raise unsupported("memory", "source", "the in-process bus has nothing but its topics")
        t = bus.topic(topic)
        g = t.groups.get(group)
        if g is None:
            g = t.groups[group] = _Group(t.base if start == "earliest" else t.base + len(t.log))
        sub = MemorySubscription(self, t, g, (topic, group))
        self._subs.add(sub)
        return sub

    @asynccontextmanager
    async def peek(self, topic: str, *, last: int = 0) -> AsyncIterator[AsyncIterator[Message]]:
        """The ``last`` newest messages still in the topic's log, then each new one; with an
        offset of its own, so no group's cursor moves."""
        check_peek(self, topic, last)
        bus = self._require_bus()
        t = bus.topic(topic)
        async with aclosing(self._follow(bus, t, t.base + max(0, len(t.log) - last))) as messages:
            yield messages

    async def _follow(self, bus: _Bus, t: _Topic, position: int) -> AsyncGenerator[Message, None]:
        while self._bus is bus:
            changed = t.changed  # taken before reading: a publish meanwhile still wakes us
            position = max(position, t.base)  # trimmed past us: what is gone is gone
            batch = t.log[position - t.base :]
            if batch:
                position += len(batch)
                for message in batch:
                    yield message
                continue
            with anyio.move_on_after(_CHECK_CLOSED):
                await changed.wait()

    async def list_topics(self) -> list[TopicInfo]:
        """Topics with messages or groups (one only peeked at is not listed)."""
        return [
            TopicInfo(name, messages=len(t.log))
            for name, t in sorted(self._require_bus().topics.items())
            if t.log or t.groups
        ]

    async def list_groups(self, topic: str) -> list[GroupInfo]:
        """``lag``: messages not handed out yet plus redeliveries waiting."""
        t = self._require_bus().topics.get(validate_name("topic", topic))
        if t is None:
            return []
        return [GroupInfo(name, lag=t.lag(g)) for name, g in sorted(t.groups.items())]

    def backlog(self, topic: str, group: str) -> int:
        """Messages the group has not been handed yet (for tests and health checks)."""
        t = self._require_bus().topics.get(topic)
        g = t.groups.get(group) if t else None
        if t is None or g is None:
            return 0
        return t.lag(g)
