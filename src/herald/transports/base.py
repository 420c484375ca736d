"""The transport contract: the one seam between Herald and a message engine.

A transport moves :class:`~herald.message.Message` envelopes; it knows nothing of typed events,
handlers or retries. Everything above it (codec, middleware, App) is written once against this
contract, so handler code runs unchanged on every engine.

Contract, in short:

* :meth:`Transport.publish` returns only once the engine holds the messages durably (for a
  persistent transport: fsync'd commit, publisher confirm, acks=all, PubAck).
* :meth:`Transport.subscribe` joins ``group`` on ``topic``. A *group* is a set of competing
  consumers: each message of the topic goes to one member of each group, and every group gets
  every message (fan-out). A group that did not exist before starts at ``start``. ``bind`` and
  ``source`` consume an engine's existing topology (what plain clients produce) the way it is
  laid out; see :meth:`Transport.subscribe`.
* :meth:`Subscription.fetch` hands out :class:`Delivery` objects. Each must end in
  :meth:`Subscription.ack` (done, never delivered to this group again) or
  :meth:`Subscription.nack` (deliver again, after ``delay`` seconds, with ``attempt + 1``).
  A delivery that is neither — the consumer crashed, was killed, or closed — comes back to the
  group: at once on :meth:`Subscription.close`, after the visibility timeout on a crash.
* :meth:`Subscription.commit` (where ``features.transactions``) publishes messages and acks
  deliveries as one atomic step: consume-transform-produce without duplicates or losses.
* :attr:`Transport.features` says what the engine guarantees. Code and tests branch on these
  flags, never on the transport's class.
* Read-only tooling: :meth:`Transport.peek` watches a topic without joining any group;
  :meth:`Transport.list_topics` / :meth:`Transport.list_groups` (where ``features.listing``)
  say what the engine holds. None of them changes what a group receives.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Self

from herald.message import Message

__all__ = [
    "Delivery",
    "Features",
    "GroupInfo",
    "PermanentTransportError",
    "Start",
    "Subscription",
    "TopicInfo",
    "Transport",
    "TransportError",
    "by_topic",
    "check_peek",
    "check_topology",
    "unsupported",
    "validate_name",
]

#: Where a group seen for the first time starts reading: the oldest retained message, or only
#: messages published from now on.
Start = Literal["earliest", "latest"]


class TransportError(Exception):
    """The engine refused or could not be reached. The message says which URL (redacted) and why.

    A plain ``TransportError`` may go away by itself (the broker was unreachable for longer than
    the transport's budget, a connection dropped and did not come back): trying again later can
    help. :class:`PermanentTransportError` is the kind that cannot.
    """


class PermanentTransportError(TransportError):
    """Retrying cannot help; the configuration must change. Raised at once, never after retries.

    Wrong or missing credentials, a user without permission (on the virtual host, the topic,
    the command), a missing virtual host, a TLS mismatch (a TLS client on a plain port, a plain
    client on a TLS port, a certificate the client does not trust), an unreadable credentials
    file, a SQLite path that cannot be opened or is not a database. The message is one line
    naming the URL (redacted) and what to fix.
    """


@dataclass(frozen=True, slots=True)
class Features:
    """What a transport guarantees. Tests and middleware branch on these, never on class names."""

    #: Published messages survive a restart of the consumer process and of the engine.
    persistent: bool
    #: Members of one group may live in different OS processes (or machines).
    cross_process: bool
    #: With one consumer and no nacks, deliveries of one key arrive in publish order.
    ordered_per_key: bool
    #: ``nack(delay=...)`` is honoured by the engine itself (not only while this process runs).
    native_delay: bool
    #: A new group with ``start="earliest"`` receives messages published before it existed.
    replay: bool
    #: Headers travel natively (otherwise they are packed into the payload frame).
    headers: bool = True
    #: Largest payload in bytes the engine accepts; ``None`` when only memory limits it.
    max_payload: int | None = None
    #: The engine may silently drop messages once this many wait for one consumer (Mosquitto's
    #: ``max_queued_messages``, 1000 by default). ``None``: no such limit. A producer that runs
    #: further ahead of its consumers than this loses messages; configure the broker.
    max_backlog: int | None = None
    #: The engine itself drops a message re-published with an id it has seen recently
    #: (JetStream's Nats-Msg-Id window), so such a duplicate never reaches a consumer.
    dedupes_by_id: bool = False
    #: :meth:`Subscription.commit` publishes and acks as one atomic step (a transaction).
    transactions: bool = False
    #: :meth:`Transport.list_topics` and :meth:`Transport.list_groups` work (the engine can
    #: enumerate its topics and a topic's groups); elsewhere they raise :class:`TransportError`.
    listing: bool = False


@dataclass(frozen=True, slots=True)
class TopicInfo:
    """One topic, as :meth:`Transport.list_topics` reports it."""

    name: str
    #: Messages the engine holds for the topic now; ``None`` where that is not cheap to know.
    messages: int | None = None


@dataclass(frozen=True, slots=True)
class GroupInfo:
    """One group of a topic, as :meth:`Transport.list_groups` reports it. A count is ``None``
    where the engine cannot tell it cheaply."""

    name: str
    #: Messages of the topic not handed to any member of the group yet (on Kafka, where the
    #: two cannot be told apart: not acked yet, so ``pending`` included).
    lag: int | None = None
    #: Messages handed to a member and not acked yet.
    pending: int | None = None
    #: Members connected now.
    consumers: int | None = None


class Delivery:
    """One message handed to one consumer of a group.

    ``attempt`` starts at 1 and grows with every redelivery of the message to the same group.
    ``token`` is the transport's own handle (a row id, a stream entry id, a delivery tag);
    nothing above the transport reads it.
    """

    __slots__ = ("attempt", "message", "token")

    def __init__(self, message: Message, attempt: int, token: Any) -> None:
        self.message = message
        self.attempt = attempt
        self.token = token

    def __repr__(self) -> str:
        m = self.message
        return f"Delivery(id={m.id!r}, topic={m.topic!r}, attempt={self.attempt})"


class Subscription(ABC):
    """A consumer's membership of one group on one topic."""

    topic: str
    group: str

    @abstractmethod
    async def fetch(self, max_messages: int, timeout: float) -> list[Delivery]:
        """Return 1..``max_messages`` deliveries, waiting at most ``timeout`` seconds for the
        first; return ``[]`` if none arrived in time.

        Cancellation never loses a message: anything claimed and not returned is redelivered
        (at once, or after the visibility timeout).
        """

    @abstractmethod
    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        """Mark deliveries as handled; this group will not see them again."""

    @abstractmethod
    async def nack(self, delivery: Delivery, delay: float = 0.0) -> None:
        """Give a delivery back: it is delivered again to this group after ``delay`` seconds,
        with ``attempt + 1``. Other messages are not held up meanwhile."""

    async def commit(self, deliveries: Sequence[Delivery], messages: Sequence[Message]) -> None:
        """Publish ``messages`` (each to its own ``topic``) and ack ``deliveries`` atomically:
        once this returns all of it is durable; if it raises, none of it happened (the
        deliveries stay unacked and the messages are never seen by consumers that read only
        committed data). Only where ``features.transactions``; elsewhere it raises
        :class:`TransportError`. ``commit([], [])`` checks that transactions work, at once.
        """
        raise TransportError(
            f"{type(self).__name__}: this transport has no transactions (features.transactions "
            "is False)"
        )

    @abstractmethod
    async def close(self) -> None:
        """Leave the group. Unacked deliveries go back to the group. Idempotent."""


class Transport(ABC):
    """A connection to one message engine, opened from a URL."""

    #: URL schemes this transport serves, e.g. ``("sqlite",)``.
    schemes: ClassVar[tuple[str, ...]] = ()
    features: Features

    @classmethod
    @abstractmethod
    def from_url(cls, url: str) -> Transport:
        """Build a transport from its URL. Raises ``ValueError`` for a malformed URL.

        Does no I/O; :meth:`connect` does.
        """

    @property
    @abstractmethod
    def url(self) -> str:
        """The URL with any password replaced by ``***``: safe for logs and errors."""

    @abstractmethod
    async def connect(self) -> None:
        """Open connections. Raises :class:`TransportError` if the engine cannot be used."""

    @abstractmethod
    async def close(self) -> None:
        """Close every subscription and connection. Idempotent."""

    @abstractmethod
    async def publish(self, topic: str, messages: Sequence[Message]) -> None:
        """Store ``messages`` on ``topic``; return once the engine holds them durably.

        ``message.topic`` is ignored in favour of ``topic``. Publishing to a topic that no
        group has joined yet keeps the messages for groups that start at ``"earliest"``
        (where :attr:`Features.replay` holds).
        """

    @abstractmethod
    async def subscribe(
        self,
        topic: str,
        group: str,
        *,
        start: Start = "earliest",
        bind: Sequence[str] = (),
        source: str | None = None,
    ) -> Subscription:
        """Join ``group`` on ``topic`` and return the subscription.

        ``bind`` and ``source`` let a group consume what plain clients of the engine already
        produce, where they produce it. Both are in the engine's own terms (each transport's
        module docstring gives the details):

        * ``bind``: routing patterns, in the engine's own syntax, over the address the engine
          routes a message by — RabbitMQ: the routing key (``order.high.*``, ``order.#``; the
          patterns replace the default ``#``, and Herald's routing key is the message key);
          NATS: a subject (``sensors.*.temp``, ``sensors.>``); MQTT: a topic filter
          (``home/+/temp``, ``home/#``). The group receives the messages whose address matches
          a pattern; what Herald publishes to ``topic`` itself keeps reaching the group, so a
          replayed dead letter comes back to it.
        * ``source``: the name of an existing engine object the group consumes in place of
          the one Herald would make for it (RabbitMQ: a queue), as it is, competing with
          whatever else consumes it. Retries and dead letters work as for any group.

        A plain client's message carries no Herald headers: it gets a stable id where the
        engine gives one (else a fresh one), no type (any handler of the group accepts it) and
        as key its routing address where the engine has one.

        A transport whose engine cannot honour ``bind`` or ``source`` raises ``ValueError``
        naming the option and the engine (see :func:`unsupported`), never ignores it. So does
        a malformed pattern.
        """

    def peek(
        self, topic: str, *, last: int = 0
    ) -> AbstractAsyncContextManager[AsyncIterator[Message]]:
        """Watch ``topic`` without taking part in it::

            async with transport.peek("orders", last=10) as messages:
                async for message in messages:
                    ...

        The iterator yields the ``last`` newest messages the engine still holds (oldest first;
        only where ``features.replay``), then every message published after the ``async with``
        was entered, until the caller stops. Leaving the block ends it; so does closing the
        transport, on some engines with an error.

        Read-only: it joins no group, acks and commits nothing, and what it needs on the engine
        (a private queue, an ephemeral consumer, a clean session) goes away when the block is
        left or its connection drops, so no group receives anything differently. Best effort:
        there is no redelivery, and a message the engine drops before the peek reads it is not
        seen; redeliveries (nacks) are not shown, only what was published to the topic.

        Raises ``ValueError`` for a bad name or a negative ``last``, and
        :class:`TransportError` where the engine cannot do it (the default), cannot replay
        ``last`` messages, or has no such topic and cannot wait for it without creating it.
        """
        raise TransportError(f"{type(self).__name__} ({self.url}) cannot peek at a topic")

    async def list_topics(self) -> list[TopicInfo]:
        """The topics the engine holds (dead-letter and skipped topics included; the
        transport's helper objects such as retry topics and delay queues left out), sorted by
        name. Read-only. Where not ``features.listing`` it raises :class:`TransportError`."""
        raise TransportError(f"{type(self).__name__} ({self.url}) cannot list topics")

    async def list_groups(self, topic: str) -> list[GroupInfo]:
        """The groups of ``topic`` (``[]`` for an unknown topic), sorted by name. Read-only.
        Where not ``features.listing`` it raises :class:`TransportError`."""
        raise TransportError(f"{type(self).__name__} ({self.url}) cannot list groups")

    async def delete_topic(self, topic: str) -> None:
        """Delete ``topic`` with its messages, groups and any helper objects (delay queues,
        retry topics). For tests and tooling; a missing topic is not an error. Transports that
        keep server-side state must implement it."""
        return None

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,199}$")


def validate_name(kind: str, name: str) -> str:
    """Check a topic or group name: 1-200 of ``A-Z a-z 0-9 _ . -``, not starting with ``.``/``-``.

    Every engine accepts these, so a name valid on SQLite stays valid on Kafka or RabbitMQ.
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name):  # fullmatch: no trailing \n
        raise ValueError(
            f"invalid {kind} name {name!r}: use 1-200 characters from A-Z a-z 0-9 _ . - "
            "(not starting with '.' or '-')"
        )
    return name


def unsupported(engine: str, option: str, why: str) -> ValueError:
    """The error for a :meth:`Transport.subscribe` option ``engine`` cannot honour: it names
    the option, the engine and the reason (raise it; never ignore the option)."""
    return ValueError(f"{option}= is not supported by the {engine} transport: {why}")


def check_topology(
    bind: Sequence[str], source: str | None, *, max_patterns: int = 255
) -> tuple[tuple[str, ...], str | None]:
    """Check the shape of ``subscribe``'s ``bind`` and ``source`` (engine-independent):
    ``bind`` a sequence of non-empty strings without duplicates (a lone ``str`` is refused:
    it would read as its characters), ``source`` ``None`` or a non-empty string. Returns
    them as a tuple and the source. Each transport checks the engine's syntax itself."""
    if isinstance(bind, str | bytes) or not isinstance(bind, Sequence):
        raise ValueError(f"bind must be a sequence of patterns, got {bind!r}")
    patterns = tuple(bind)
    for p in patterns:
        if not isinstance(p, str) or not p or p != p.strip() or "\x00" in p:
            raise ValueError(f"bind patterns must be non-empty strings, got {p!r}")
    if len(set(patterns)) != len(patterns):
        raise ValueError(f"bind has a pattern twice: {list(patterns)!r}")
    if len(patterns) > max_patterns:
        raise ValueError(f"bind takes at most {max_patterns} patterns, got {len(patterns)}")
    if source is not None and (not isinstance(source, str) or not source or "\x00" in source):
        raise ValueError(f"source must be a non-empty name, got {source!r}")
    return patterns, source


def check_peek(transport: Transport, topic: str, last: int) -> None:
    """Check the arguments of :meth:`Transport.peek` before it touches the engine."""
    validate_name("topic", topic)
    if not isinstance(last, int) or last < 0:
        raise ValueError(f"last must be a whole number >= 0, not {last!r}")
    if last and not transport.features.replay:
        raise TransportError(
            f"{transport.url} cannot replay: a new reader sees only messages published after "
            "it started (features.replay is False), so it cannot show the last messages"
        )


def by_topic(messages: Sequence[Message]) -> dict[str, list[Message]]:
    """``messages`` grouped by their ``topic`` (names validated), in first-seen order."""
    out: dict[str, list[Message]] = {}
    for m in messages:
        batch = out.get(m.topic)
        if batch is None:
            validate_name("topic", m.topic)
            batch = out[m.topic] = []
        batch.append(m)
    return out
