"""The RabbitMQ transport: ``amqp://user:password@host:5672/vhost`` (``amqps://`` for TLS).

Mapping onto RabbitMQ
---------------------

* **topic** = a durable *topic exchange* named exactly like the topic. One that exists with
  other settings (a plain client's ``declare_exchange("orders", "topic", durable=True)``,
  without Herald's alternate exchange) is used as it is, without parking.
* **group** = a durable *classic queue* ``<topic>:<group>`` bound to the exchange with ``#``
  (every group gets every message). ``subscribe(bind=[...])`` (``@app.subscriber(...,
  bind="order.high.*")``) binds it with AMQP topic patterns instead — content-based routing on
  the message key, which is the routing key; so does ``bind=GROUP:PATTERN`` in the URL
  (repeatable, e.g. ``?bind=eu-billing:order.eu.#``) for a group whose subscriber gives none.
* **source queue** = ``subscribe(source="q")``: the group consumes the existing queue ``q``
  instead, as it is (passively declared: its type, classic or quorum, and arguments are its
  owner's), competing with its other consumers — e.g. a queue a plain producer fills through
  the default exchange (``routing_key="q"``). It is also bound to the topic exchange (``#``,
  or the ``bind`` patterns), so what Herald publishes to the topic — a replayed dead letter —
  reaches it. Redeliveries go back into ``q`` (where any consumer of it may take them): nack
  and close copies straight, delayed ones through ``q:delay:<bucket ms>``; dead letters go to
  ``<topic>.<group>.dlq`` like every group's. ``delete_topic`` never deletes ``q``.
* **publish** = persistent messages (``delivery_mode=2``) with publisher confirms; a batch is
  written at once and the call returns when the broker confirmed all of it.
* **fetch** = each subscription has one consumer on its own channel, with ``basic.qos``
  prefetch equal to the ``max_messages`` of the fetch that opened it; see *Consuming* below.
* **ack** = ``basic.ack`` (``multiple=True`` when the acked tags are a prefix of the channel's
  outstanding ones). **nack()** = a copy carrying ``attempt + 1`` in ``x-herald-attempt`` is
  published (confirmed) straight to the group's queue, then the original is acked.
  **nack(delay)** = the copy goes to a per-queue *delay queue* ``<queue>:delay:<bucket ms>``
  (``<topic>:<group>:delay:...`` for a group's own queue) with a per-message TTL of exactly
  ``delay``, which dead-letters it back to the queue. Buckets are powers of two (16 ms, 32 ms,
  ...), so one long delay never holds up a short one for longer than its own bucket; a delay
  can be late by at most its bucket's width, never early. No delayed-message plugin is
  needed, and the delay survives restarts of either side.
* **attempt** = ``x-herald-attempt`` header (set when the transport republishes; absent means
  1), plus 1 if the broker flags the delivery ``redelivered`` (it came back after a crashed
  consumer or a lost connection). A classic queue's flag is only a boolean, which is why the
  transport hands messages back as copies carrying their attempt (nack, close) instead of
  requeueing them: a requeue would leave a message that failed twice at attempt 2.
* **close()** cancels the consumer, republishes (confirmed) every unacked delivery to the
  group's queue — handed-out ones at ``attempt + 1``, buffered ones never handed out at their
  own attempt — acks the originals and closes the channel. If that fails, closing the channel
  returns them anyway (as ``redelivered``).
* **dead letters** are Herald's ``<topic>.<group>.dlq`` topic — just another exchange.
* **registry** = a durable queue ``<topic>::registry`` whose messages name the topic's groups
  and delay queues (:mod:`.registry`), so ``delete_topic`` from any process removes them all.

Consuming
---------

A consumer that is opened and cancelled for every fetch gives the exact accounting (the broker
never handed this process more than the fetch returned) but costs two round trips per fetch,
which dominated latency. So the consumer stays open while the subscription is fetching — the
App's consume loop calls ``fetch`` again at once — and the broker pushes each message the
moment it is routed. It is *paused* (``basic.cancel`` with no-wait) when deliveries are acked
or nacked while no fetch is waiting, and after ``IDLE_PAUSE`` (50 ms) without a waiting fetch;
the next fetch reopens it (``basic.consume`` with no-wait). Neither waits for a reply, so a
fetch costs no round trip. Because the broker applies the cancel before the ack that follows
it, the window freed by an ack is not refilled while the caller is between fetches.

What remains: messages pushed while a fetch's batch is being handled (at most one prefetch
window, and only until the next ack or ``IDLE_PAUSE``) sit in the client's buffer. A fetch
served from that buffer reopens a paused consumer, so the broker refills while the batch is
handled, as a plain prefetching client would. Buffered messages are handed out by the next
fetch in queue order, and on ``close()`` given back at their own attempt; but if the process
dies hard (SIGKILL, power loss) at that instant, the broker redelivers them flagged
``redelivered`` and they report one attempt more than any handler saw. Handed-out deliveries
and messages still in the queue are counted exactly.

Replay (``Features.replay = False``)
------------------------------------

A queue only receives messages published while it is bound, so a *new* group cannot see
what other groups already received. One thing is kept, though: every topic exchange has an
alternate exchange ``<topic>:parked`` with a queue of the same name, which holds messages
published while **no** group was bound (so they are not dropped, e.g. dead letters nobody reads
yet). The first group that joins with ``start="earliest"`` takes them over (they are republished
to the topic exchange once the group is bound). Messages published while a group's queue exists
but no consumer runs stay in the queue.

Wire format
-----------

An envelope is one AMQP message, published to the exchange ``<topic>``:

==============  ==========================================================================
envelope        AMQP
==============  ==========================================================================
``id``          ``message_id`` property (missing on a plain client's message: a new id)
``key``         routing key; ``""`` means no key. A key that is ``""`` or longer than 255
                bytes travels in the header ``x-herald-key`` (which wins when present)
``type``        ``type`` property
``payload``     the body, byte for byte
``headers``     the headers table, as strings (a plain client's non-string values are
                converted with ``str``; bytes as UTF-8). ``content_type`` is also written to
                the ``content_type`` property and read from it when the header is missing
attempt         ``x-herald-attempt`` header + ``redelivered`` flag (see above)
==============  ==========================================================================

Headers starting ``x-herald-``, ``x-death``, ``x-first-death-*``, ``x-last-death-*`` and
``x-delivery-count`` belong to the transport and the broker, not the envelope. A plain client
publishes with ``exchange.publish(aio_pika.Message(body, message_id=..., type=...,
headers={...}, delivery_mode=2), routing_key=KEY)`` and consumes a group by reading the queue
``<topic>:<group>``. A plain message without ``message_id`` gets a new id when first delivered,
kept by its redelivery copies; one published through the default exchange straight into a
``source`` queue has the queue's name as routing key, and so as key.

Connection
----------

:meth:`RabbitMQTransport.connect` retries an unreachable broker with backoff for
``connect_timeout`` seconds (URL option, default 10, the same budget on every transport:
:mod:`herald.transports.connecting`), then raises one ``TransportError`` naming the URL, the
budget and the cause. A refused login (ACCESS_REFUSED), a virtual host that does not exist or
is closed to the user (NOT_ALLOWED) and a TLS mismatch raise ``PermanentTransportError`` at
once, as does a missing permission (ACCESS_REFUSED on a declare, publish or consume) later:
retrying cannot fix them. TLS for ``amqps://``: the ``cafile``, ``capath``, ``certfile``,
``keyfile`` and ``no_verify_ssl`` options. A lost connection is re-established in the
background with backoff (0.1 s doubling to 5 s, logged); publishes wait for it (up to 60 s)
and repeat the unconfirmed batch; fetches return ``[]`` meanwhile; acks of deliveries from
the lost connection are dropped because the broker has already put those messages back.

Modules: this one holds the transport (topology, publish, subscribe, delete);
``connection`` the self-healing connection, ``subscription`` the consumer,
``options`` the URL options, ``wire`` object names and the envelope encoding, ``registry``
what hangs off each topic.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, ClassVar, cast

import aiormq
from aiormq.abc import DeliveredMessage
from pamqp.commands import Basic

from herald.message import Message
from herald.transports.base import (
    Features,
    GroupInfo,
    Start,
    Subscription,
    TopicInfo,
    Transport,
    TransportError,
    check_peek,
    check_topology,
    validate_name,
)
from herald.transports.rabbitmq import peek
from herald.transports.rabbitmq.connection import GONE, Link, refused
from herald.transports.rabbitmq.options import Options, parse_url
from herald.transports.rabbitmq.registry import Entries, registry_queue, take
from herald.transports.rabbitmq.subscription import RabbitMQSubscription
from herald.transports.rabbitmq.wire import (
    MAX_PAYLOAD,
    check_pattern,
    check_source_queue,
    delay_bucket,
    delay_queue,
    encode,
    exchange_name,
    group_queue,
    parked_name,
)

__all__ = ["MAX_PAYLOAD", "RabbitMQSubscription", "RabbitMQTransport"]

log = logging.getLogger("herald.transports.rabbitmq")

_PUBLISH_PATIENCE = 60.0  # seconds a publish waits for a lost connection to come back

#: Topics (and their groups) this process declared. delete_topic reads what a topic has from
#: its registry on the broker (any process can); this also lets tests find what they made.
_created_groups: dict[str, set[str]] = {}


class _Inequivalent(TransportError):
    """The broker refused a declaration: an object of that name exists with other settings."""


_NO_LISTING = (
    "RabbitMQ at {url} cannot list {what}: AMQP 0-9-1 has no request that lists exchanges, "
    "queues or bindings (use the management UI, its HTTP API or rabbitmqctl)"
)
_created_delays: dict[str, set[str]] = {}


class RabbitMQTransport(Transport):
    """RabbitMQ through AMQP 0-9-1 (aiormq, the protocol layer of aio-pika)."""

    schemes: ClassVar[tuple[str, ...]] = ("amqp", "amqps")
    features = Features(
        persistent=True,
        cross_process=True,
        ordered_per_key=True,
        native_delay=True,
        replay=False,
        headers=True,
        max_payload=MAX_PAYLOAD,
    )

    def __init__(self, options: Options) -> None:
        self._options = options
        self._link: Link | None = None
        self._subs: set[RabbitMQSubscription] = set()
        self._exchanges: set[str] = set()
        self._queues: set[str] = set()
        #: what this transport has put in each topic's registry already
        self._recorded: dict[str, Entries] = {}
        self._topo_lock = asyncio.Lock()

    @classmethod
    def from_url(cls, url: str) -> RabbitMQTransport:
        return cls(parse_url(url))

    @property
    def url(self) -> str:
        return self._options.redacted

    def _link_or_fail(self) -> Link:
        if self._link is None or self._link.closed:
            raise TransportError(f"{self.url} is not connected: call connect() or use 'async with'")
        return self._link

    async def connect(self) -> None:
        if self._link is not None and not self._link.closed:
            return
        link = Link(self._options)
        await link.open()
        self._link = link

    async def close(self) -> None:
        for sub in list(self._subs):
            await sub.close()
        link, self._link = self._link, None
        if link is not None:
            await link.close()

    # -- topology ----------------------------------------------------------------------

    @staticmethod
    def _check_topic(topic: str) -> None:
        validate_name("topic", topic)
        if topic.startswith("amq."):
            raise ValueError(f"topic {topic!r}: names starting 'amq.' are reserved by RabbitMQ")

    async def _declare(self, work: Any, what: str) -> None:
        """Run ``work(channel)`` on the topology channel, turning broker refusals into
        ``TransportError`` (the broker closes the channel; the next call opens another), a
        missing permission into :class:`PermanentTransportError`."""
        link = self._link_or_fail()
        async with self._topo_lock:
            ch = await link.topo(_PUBLISH_PATIENCE)
            try:
                await work(ch)
            except aiormq.exceptions.ChannelAccessRefused as e:
                raise refused(self._options, e, what) from None
            except aiormq.exceptions.ChannelPreconditionFailed as e:
                raise _Inequivalent(
                    f"RabbitMQ at {self.url} refused a declaration (an object of that name "
                    f"exists with other settings): {e}"
                ) from None

    async def _ensure_topic(self, topic: str) -> None:
        """Declare the topic exchange (and its parked queue). An exchange of that name that
        exists with other settings — declared by a plain client, e.g. ``declare_exchange(
        "orders", "topic", durable=True)`` — is used as it is: its owner's settings win, and
        the parked queue, which that exchange would never use, is removed again."""
        if topic in self._exchanges:
            return
        parked = parked_name(topic)
        exchange = exchange_name(topic)

        async def work(ch: aiormq.abc.AbstractChannel) -> None:
            await ch.exchange_declare(parked, exchange_type="fanout", durable=True)
            await ch.queue_declare(parked, durable=True)
            await ch.queue_bind(parked, parked, routing_key="")
            await ch.exchange_declare(
                exchange,
                exchange_type="topic",
                durable=True,
                arguments={"alternate-exchange": parked},
            )

        async def foreign(ch: aiormq.abc.AbstractChannel) -> None:
            await ch.exchange_declare(exchange, passive=True)
            with contextlib.suppress(aiormq.exceptions.ChannelPreconditionFailed):
                await ch.queue_delete(parked, if_empty=True)  # not empty: keep what it holds
                await ch.exchange_delete(parked)

        try:
            await self._declare(work, f"declare the exchanges of topic {topic!r}")
        except _Inequivalent:
            await self._declare(foreign, f"use the existing exchange {exchange!r}")
            log.info("exchange %r exists with other settings: using it as it is", exchange)
        self._exchanges.add(topic)
        _created_groups.setdefault(topic, set())

    async def _ensure_delay_queue(self, topic: str, target: str, base: str, bucket: int) -> str:
        """The delay queue of ``bucket`` that dead-letters into the queue ``target``."""
        name = delay_queue(base, bucket)
        if name in self._queues:
            return name

        async def work(ch: aiormq.abc.AbstractChannel) -> None:
            await ch.queue_declare(
                name,
                durable=True,
                arguments={
                    "x-dead-letter-exchange": "",
                    "x-dead-letter-routing-key": target,
                },
            )

        await self._declare(work, f"declare the delay queue {name!r}")
        await self._record(topic, Entries(queues={name}))
        self._queues.add(name)
        return name

    async def _record(self, topic: str, entries: Entries) -> None:
        """Add ``entries`` to ``topic``'s registry (see :mod:`.registry`), once per transport."""
        known = self._recorded.setdefault(topic, Entries())
        if known.covers(entries):
            return
        queue = registry_queue(topic)

        async def work(ch: aiormq.abc.AbstractChannel) -> None:
            taken, last = await take(ch, queue)
            if last is not None and taken.covers(entries):
                await ch.basic_nack(last, multiple=True, requeue=True)
                return
            taken.merge(entries)
            props = Basic.Properties(delivery_mode=2, content_type="application/json")
            # the union is stored (confirmed) before what it replaces is acked
            await self._publish_frames("", [((queue, props), taken.encode())], ensure_topic=None)
            if last is not None:
                await ch.basic_ack(last, multiple=True)

        await self._declare(work, f"record {topic!r} in its registry queue")
        known.merge(entries)

    # -- publish -----------------------------------------------------------------------

    async def publish(self, topic: str, messages: Sequence[Message]) -> None:
        self._check_topic(topic)
        self._link_or_fail()
        if not messages:
            return
        for m in messages:
            if len(m.payload) > MAX_PAYLOAD:
                raise ValueError(
                    f"payload of {len(m.payload):,} bytes exceeds RabbitMQ's max_message_size "
                    f"of {MAX_PAYLOAD:,} bytes (message {m.id})"
                )
        frames = [(encode(m), m.payload) for m in messages]
        await self._publish_frames(exchange_name(topic), frames, ensure_topic=topic)

    async def _publish_frames(
        self,
        exchange: str,
        frames: list[tuple[tuple[str, Basic.Properties], bytes]],
        *,
        ensure_topic: str | None,
    ) -> None:
        """Publish and await every confirm; after a lost connection repeat the whole batch
        (at-least-once: the broker may hold a few twice) for up to a minute."""
        link = self._link_or_fail()
        deadline = time.monotonic() + _PUBLISH_PATIENCE
        while True:
            try:
                if ensure_topic is not None:
                    await self._ensure_topic(ensure_topic)
                ch = await link.pub(max(0.001, deadline - time.monotonic()))
                publish: Any = ch.basic_publish  # (aiormq's abc lacks its `wait` flag)
                results = await asyncio.gather(
                    *[
                        publish(body, exchange=exchange, routing_key=rk, properties=p, wait=False)
                        for (rk, p), body in frames
                    ]
                )
                if any(not isinstance(r, Basic.Ack) for r in results):
                    raise TransportError(f"RabbitMQ at {self.url} refused (nacked) a publish")
                return
            except aiormq.exceptions.ChannelAccessRefused as e:
                raise refused(self._options, e, f"publish to {exchange!r}") from None
            except aiormq.exceptions.ChannelNotFoundEntity:
                # the exchange was deleted under us (delete_topic elsewhere): declare again
                if ensure_topic is None:
                    raise TransportError(f"{exchange!r} does not exist on {self.url}") from None
                self._exchanges.discard(ensure_topic)
            except (*GONE, TimeoutError) as e:
                if link.closed:
                    raise TransportError(f"RabbitMQ transport {self.url} is closed") from None
                if time.monotonic() >= deadline:
                    raise TransportError(
                        f"publish to {exchange!r} on {self.url} not confirmed within "
                        f"{_PUBLISH_PATIENCE:g}s: {link.scrub(e)}"
                    ) from None
                log.info("publish to %r interrupted (%s); retrying", exchange, link.scrub(e))
                await asyncio.sleep(0.1)

    async def _republish(
        self, sub: RabbitMQSubscription, items: Sequence[tuple[Message, int]], delay: float
    ) -> None:
        """Put copies of ``items`` (message, attempt of its next delivery) on the queue
        ``sub`` consumes, after ``delay`` seconds through a delay queue; return once
        confirmed."""
        if delay > 0:
            bucket = delay_bucket(delay)
            queue = await self._ensure_delay_queue(sub.topic, sub.queue, sub.delay_base, bucket)
            expiration: str | None = str(max(1, round(delay * 1000)))
        else:
            queue = sub.queue
            expiration = None
        frames = []
        for message, attempt in items:
            _, props = encode(message, attempt=attempt, key_header=True)
            props.expiration = expiration
            frames.append(((queue, props), message.payload))
        await self._publish_frames("", frames, ensure_topic=None)

    # -- subscribe ---------------------------------------------------------------------

    async def subscribe(
        self,
        topic: str,
        group: str,
        *,
        start: Start = "earliest",
        bind: Sequence[str] = (),
        source: str | None = None,
    ) -> Subscription:
        """Join ``group`` on ``topic``: its queue ``<topic>:<group>`` is declared and bound to
        the topic exchange with the ``bind`` patterns (AMQP topic patterns over the routing
        key, which is Herald's message key; default ``#``, everything). The URL's
        ``bind=GROUP:PATTERN`` applies to a group whose subscriber gives none; both giving
        different patterns is a ``ValueError``.

        ``source`` names an existing queue to consume instead, as it is (a passive declare:
        its type and arguments are its owner's; a missing one is a ``TransportError``), e.g.
        one a plain producer fills through the default exchange. The queue is also bound to
        the topic exchange with the patterns (``#`` by default), so what Herald publishes to
        the topic — a replayed dead letter among it — reaches the group. Redeliveries go back
        into that queue: ``nack()`` and ``close()`` copies straight, ``nack(delay)`` through
        Herald's delay queues ``<source>:delay:<bucket ms>``; dead letters go to
        ``<topic>.<group>.dlq`` like any group's."""
        self._check_topic(topic)
        validate_name("group", group)
        if start not in ("earliest", "latest"):
            raise ValueError(f"start must be 'earliest' or 'latest', not {start!r}")
        given, source = check_topology(bind, source)
        for p in given:
            check_pattern(p)
        if source is not None:
            check_source_queue(source)
        in_url = self._options.bindings.get(group)
        if given and in_url is not None and set(given) != set(in_url):
            raise ValueError(
                f"group {group!r} on {topic!r}: bind={list(given)!r} differs from the broker "
                f"URL's bind={group}:... patterns {in_url!r}; give them in one place"
            )
        patterns = list(given or in_url or ["#"])
        self._link_or_fail()
        await self._ensure_topic(topic)
        queue = source if source is not None else group_queue(topic, group)
        exchange = exchange_name(topic)

        async def work(ch: aiormq.abc.AbstractChannel) -> None:
            if source is None:
                await ch.queue_declare(queue, durable=True, arguments={"x-queue-type": "classic"})
            else:
                try:
                    await ch.queue_declare(queue, passive=True)
                except aiormq.exceptions.ChannelNotFoundEntity:
                    raise TransportError(
                        f"queue {queue!r} does not exist on {self.url}: source= names an "
                        "existing queue (declare it first, or leave source out and Herald "
                        "makes one for the group)"
                    ) from None
            for pattern in patterns:
                await ch.queue_bind(queue, exchange, routing_key=pattern)
            if "#" not in patterns:  # a group re-bound to patterns stops getting everything
                await ch.queue_unbind(queue, exchange, routing_key="#")

        await self._declare(work, f"declare and bind the queue {queue!r}")
        await self._record(topic, Entries(groups={group}))
        _created_groups.setdefault(topic, set()).add(group)
        if start == "earliest":
            await self._unpark(topic)
        base = source if source is not None else f"{topic}:{group}"
        sub = RabbitMQSubscription(self, topic, group, queue, base)
        self._subs.add(sub)
        return sub

    async def _unpark(self, topic: str) -> None:
        """Hand messages published while no group was bound to the groups bound now."""
        parked = parked_name(topic)
        taken: list[DeliveredMessage] = []

        async def work(ch: aiormq.abc.AbstractChannel) -> None:
            declared = await ch.queue_declare(parked, durable=True)
            count = declared.message_count or 0
            for _ in range(count):
                got = await ch.basic_get(parked, no_ack=False)
                if not isinstance(got.delivery, Basic.GetOk):
                    break
                taken.append(got)
            if not taken:
                return
            frames = []
            for msg in taken:
                got_ok = cast(Basic.GetOk, msg.delivery)
                frames.append(((got_ok.routing_key or "", msg.header.properties), msg.body))
            # confirmed on the publish channel before the parked copies are acked
            await self._publish_frames(exchange_name(topic), frames, ensure_topic=None)
            last = cast(Basic.GetOk, taken[-1].delivery)
            await ch.basic_ack(last.delivery_tag or 0, multiple=True)

        await self._declare(work, f"move the parked messages of topic {topic!r}")

    # -- read-only tooling -------------------------------------------------------------

    def peek(
        self, topic: str, *, last: int = 0
    ) -> AbstractAsyncContextManager[AsyncIterator[Message]]:
        """A private queue bound to the topic's exchange (see
        :mod:`herald.transports.rabbitmq.peek`); ``last`` is refused (no replay)."""
        self._check_topic(topic)
        check_peek(self, topic, last)
        self._link_or_fail()
        return peek.peek(self, topic)

    async def list_topics(self) -> list[TopicInfo]:
        raise TransportError(_NO_LISTING.format(what="topics", url=self.url))

    async def list_groups(self, topic: str) -> list[GroupInfo]:
        raise TransportError(_NO_LISTING.format(what="groups", url=self.url))

    # -- delete ------------------------------------------------------------------------

    async def delete_topic(self, topic: str) -> None:
        """Delete the topic's exchange, its groups' queues, their delay queues, the parked
        queue and the registry, then the dead-letter and skipped topics of its groups. What
        to delete is read from the topic's registry on the broker, so a process that created
        none of it finds it all (objects made by a Herald without registries excepted)."""
        self._check_topic(topic)
        found = Entries(groups=_created_groups.pop(topic, set()))
        registry = registry_queue(topic)
        parked = parked_name(topic)

        async def work(ch: aiormq.abc.AbstractChannel) -> None:
            recorded, _ = await take(ch, registry)  # left unacked: deleted with the queue
            found.merge(recorded)
            queues = [group_queue(topic, g) for g in sorted(found.groups)] + sorted(found.queues)
            for q in [*queues, parked, registry]:
                await ch.queue_delete(q)
            await ch.exchange_delete(exchange_name(topic))
            await ch.exchange_delete(parked)

        await self._declare(work, f"delete topic {topic!r}")
        self._exchanges.discard(topic)
        self._queues.difference_update(found.queues)
        self._recorded.pop(topic, None)
        for g in sorted(found.groups):  # the dead-letter and skipped topics of these groups
            for suffix in ("dlq", "skipped"):
                derived = f"{topic}.{g}.{suffix}"
                try:
                    self._check_topic(derived)
                except ValueError:
                    continue  # too long to be a topic: never created
                await self.delete_topic(derived)
