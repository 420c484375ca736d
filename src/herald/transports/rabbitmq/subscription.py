"""A group member of :mod:`herald.transports.rabbitmq.transport`: one consumer of the group's queue,
on a channel of its own, that the broker pushes to while the member is fetching.

The consumer's life (the *why* is in the transport's module docstring, "Consuming"):

* The first :meth:`~RabbitMQSubscription.fetch` on a channel sets ``basic.qos`` prefetch to
  its ``max_messages`` and opens the consumer (``basic.consume``, awaiting ``consume-ok``: a
  missing queue fails the fetch). Later fetches find it open and only wait for deliveries;
  one served from the buffer reopens a paused consumer, so the broker refills meanwhile.
* The consumer is *paused* (``basic.cancel`` with no-wait: no round trip) when the caller
  settles deliveries while no fetch waits (:meth:`~RabbitMQSubscription.ack`,
  :meth:`~RabbitMQSubscription.nack`), and when no fetch came for :data:`IDLE_PAUSE` seconds.
  The broker applies the cancel before the ack, so the acked slots of the prefetch window are
  never refilled into a buffer that no fetch is waiting for. The next fetch reopens it with
  no-wait too (a queue deleted meanwhile closes the channel, which wakes the fetch); a new
  prefetch size costs one ``qos-ok`` round trip.
* Deliveries that were on their way when the consumer was paused still arrive (the consumer
  tag is reused and stays registered with the client library); they wait in the buffer, in
  queue order, for the next fetch.
* :meth:`~RabbitMQSubscription.close` cancels the consumer and waits until nothing more can
  arrive (see :meth:`~RabbitMQSubscription._stop_consumer`), hands back what it holds as
  confirmed copies carrying their attempt (buffered: unchanged; handed out: ``+1``), acks the
  originals up to the newest tag it holds and closes the channel.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Sequence
from typing import Any, Protocol, cast

import aiormq
import anyio
import anyio.lowlevel
from aiormq.abc import DeliveredMessage
from pamqp.commands import Basic

from herald.message import Message, new_id
from herald.transports.base import Delivery, Subscription, TransportError
from herald.transports.rabbitmq.connection import GONE, Link, refused
from herald.transports.rabbitmq.wire import decode

__all__ = ["IDLE_PAUSE", "Owner", "RabbitMQSubscription"]

log = logging.getLogger("herald.transports.rabbitmq")

#: Seconds without a waiting fetch after which the consumer is paused. Short: it bounds how long
#: the broker keeps pushing into a buffer nobody fetches from (see the module docstring).
IDLE_PAUSE = 0.05
_MAX_PREFETCH = 65535  # basic.qos prefetch_count is a 16-bit field


class Owner(Protocol):
    """What a subscription uses of the transport that made it. The transport module imports
    this one, so this one names these members instead of importing the transport class."""

    @property
    def _subs(self) -> set[RabbitMQSubscription]:
        """The transport's open subscriptions; a closing one removes itself."""
        ...

    def _link_or_fail(self) -> Link: ...

    async def _republish(
        self, sub: RabbitMQSubscription, items: Sequence[tuple[Message, int]], delay: float
    ) -> None: ...


class RabbitMQSubscription(Subscription):
    """One consumer of a group's queue, on its own channel."""

    def __init__(self, owner: Owner, topic: str, group: str, queue: str, delay_base: str) -> None:
        self.topic = topic
        self.group = group
        #: the queue consumed: the group's own, or a ``source=`` queue
        self.queue = queue
        #: what its delay queues are named after (``delay_queue``)
        self.delay_base = delay_base
        self._owner = owner
        self._link: Link = owner._link_or_fail()
        self._ch: aiormq.Channel | None = None
        # one consumer tag for every consumer this member opens: deliveries of a paused one
        # still find their callback
        self._tag = f"herald.{new_id()}"
        self._consuming = False  # the consumer is open (not paused) on self._ch
        self._qos = 0
        self._verified: aiormq.Channel | None = None  # the channel a consume-ok came on
        self._close_reason: BaseException | None = None
        # delivered to this channel, not handed out yet
        self._buffer: deque[DeliveredMessage] = deque()
        # delivery tags the broker considers outstanding on self._ch
        self._outstanding: set[int] = set()
        # handed out by fetch, not acked or nacked yet: tag -> delivery
        self._handed: dict[int, Delivery] = {}
        self._wake = asyncio.Event()
        self._closed = False
        self._fetching = False
        # serialises opening and pausing the consumer, so their frames go out in call order
        self._consumer_lock = asyncio.Lock()
        self._idle_timer: asyncio.TimerHandle | None = None
        self._idle_task: asyncio.Task[None] | None = None

    # -- channel and consumer ------------------------------------------------------------

    async def _channel(self, timeout: float) -> aiormq.Channel:
        ch = self._ch
        if ch is None or ch.is_closed:
            # a new channel: whatever the old one held went back to the queue
            self._buffer.clear()
            self._outstanding.clear()
            self._handed.clear()
            self._qos = 0
            self._consuming = False
            self._verified = None
            ch = self._ch = cast(aiormq.Channel, await self._link.channel(timeout))
            ch.closing.add_done_callback(self._on_channel_closed)
        return ch

    def _on_channel_closed(self, closing: asyncio.Future[Any]) -> None:
        # wake a waiting fetch: nothing more arrives on this channel
        if not closing.cancelled():
            self._close_reason = closing.exception()
        self._wake.set()

    async def _on_message(self, msg: DeliveredMessage) -> None:
        if msg.channel is not self._ch:
            return  # a late delivery on a channel we gave up: the broker takes it back
        self._outstanding.add(cast(Basic.Deliver, msg.delivery).delivery_tag or 0)
        self._buffer.append(msg)
        self._wake.set()

    async def _resume(self, ch: aiormq.Channel, max_messages: int) -> None:
        """Open the consumer with a prefetch window of ``max_messages``.

        The first consumer on a channel awaits ``consume-ok`` (a missing queue fails here);
        later ones are sent with no-wait, so reopening costs no round trip. RPCs are shielded:
        a cancelled one would make the client library close the channel."""
        async with self._consumer_lock:
            if self._consuming and self._tag not in ch.consumers:
                self._consuming = False  # the broker cancelled it (queue deleted)
            if self._consuming:
                return
            want = min(max_messages, _MAX_PREFETCH)
            with anyio.CancelScope(shield=True):
                if self._qos != want:
                    await ch.basic_qos(prefetch_count=want)
                    self._qos = want
                if self._verified is ch:
                    ch.consumers[self._tag] = self._on_message
                    consume = Basic.Consume(queue=self.queue, consumer_tag=self._tag, nowait=True)
                    await ch.rpc(consume)
                else:
                    ch.consumers.pop(self._tag, None)  # the library refuses a known tag
                    await ch.basic_consume(
                        self.queue, self._on_message, no_ack=False, consumer_tag=self._tag
                    )
                    self._verified = ch
            self._consuming = True

    async def _pause(self) -> None:
        """Cancel the consumer unless a fetch is waiting, without waiting for ``cancel-ok``;
        keep receiving the deliveries that were already on their way (the tag stays
        registered with the client library).

        Returns once the cancel is queued for the wire, so a frame sent after it (an ack)
        reaches the broker after it."""
        async with self._consumer_lock:
            ch = self._ch
            if not self._consuming or self._fetching or ch is None or ch.is_closed:
                return
            self._consuming = False
            with contextlib.suppress(*GONE), anyio.CancelScope(shield=True):
                await ch.rpc(Basic.Cancel(consumer_tag=self._tag, nowait=True))

    def _arm_idle_pause(self) -> None:
        if self._consuming and not self._closed and self._idle_timer is None:
            loop = asyncio.get_running_loop()
            self._idle_timer = loop.call_later(IDLE_PAUSE, self._on_idle)

    def _disarm_idle_pause(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None

    def _on_idle(self) -> None:
        self._idle_timer = None
        if self._consuming and not self._fetching and not self._closed:
            self._idle_task = asyncio.get_running_loop().create_task(self._pause())

    # -- contract ---------------------------------------------------------------------

    async def fetch(self, max_messages: int, timeout: float) -> list[Delivery]:
        if max_messages < 1:
            raise ValueError("max_messages must be at least 1")
        self._check_open()
        # a cancellation lands here, before anything is claimed
        await anyio.lowlevel.checkpoint()
        self._disarm_idle_pause()
        if self._buffer:
            ch = self._ch
            if (
                not self._consuming
                and ch is not None
                and ch is self._verified
                and not ch.is_closed
                and self._qos == min(max_messages, _MAX_PREFETCH)
            ):
                # the caller is fetching: let the broker refill while it handles this batch
                # (a no-wait consume, so no round trip; before claiming, for cancellation)
                with contextlib.suppress(*GONE):
                    await self._resume(ch, max_messages)
            out = self._take(max_messages)
            self._arm_idle_pause()
            return out
        if self._fetching:
            raise RuntimeError("fetch() is already running on this subscription")
        self._fetching = True
        try:
            return await self._wait(max_messages, max(0.0, timeout))
        finally:
            self._fetching = False
            self._arm_idle_pause()

    async def _wait(self, max_messages: int, timeout: float) -> list[Delivery]:
        deadline = time.monotonic() + timeout
        try:
            ch = await self._channel(max(timeout, 0.001))
            await self._resume(ch, max_messages)
        except TimeoutError:
            return []
        except aiormq.exceptions.ChannelNotFoundEntity:
            self._ch = None
            raise self._gone() from None
        except aiormq.exceptions.ChannelAccessRefused as e:
            self._ch = None
            raise refused(self._link.options, e, f"consume from {self.queue!r}") from None
        except GONE as e:
            log.debug("fetch on %s: channel unavailable (%s)", self.queue, e)
            self._ch = None
            await anyio.sleep(max(0.0, min(0.2, deadline - time.monotonic())))
            return []
        # a cancellation while waiting leaves what arrived in the buffer, for the next fetch
        remaining = deadline - time.monotonic()
        if not self._buffer and remaining > 0 and not ch.is_closed:
            self._wake.clear()
            with anyio.move_on_after(remaining):
                await self._wake.wait()
        if ch.is_closed:  # what it held went back to the queue
            self._ch = None
            if isinstance(self._close_reason, aiormq.exceptions.ChannelNotFoundEntity):
                raise self._gone()
            return []
        return self._take(max_messages)

    def _gone(self) -> TransportError:
        return TransportError(
            f"queue {self.queue!r} of group {self.group!r} on {self.topic!r} is gone "
            "(topic deleted?)"
        )

    def _decoded(self, messages: Sequence[DeliveredMessage]) -> list[Delivery]:
        out: list[Delivery] = []
        topic = self.topic
        for msg in messages:
            frame = cast(Basic.Deliver, msg.delivery)
            message, attempt = decode(
                topic,
                frame.routing_key or "",
                msg.header.properties,
                msg.body,
                bool(getattr(frame, "redelivered", False)),
            )
            out.append(Delivery(message, attempt, (msg.channel, frame.delivery_tag)))
        return out

    def _take(self, n: int) -> list[Delivery]:
        buf = self._buffer
        ch = self._ch
        batch: list[DeliveredMessage] = []
        while buf and len(batch) < n:
            msg = buf.popleft()
            if msg.channel is ch:
                batch.append(msg)
        out = self._decoded(batch)
        handed = self._handed
        for d in out:
            handed[d.token[1]] = d
        return out

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        if self._closed or not deliveries:
            return
        # first: the freed prefetch slots must not fill a buffer no fetch is waiting for
        await self._pause()
        # from here to the first ack frame nothing yields: another task's multiple-ack
        # decision must see `outstanding` and the wire in the same state
        ch = self._ch
        if ch is None or self._closed:
            return
        tags = sorted(
            t[1] for t in (d.token for d in deliveries) if t[0] is ch and t[1] in self._outstanding
        )
        if not tags:
            return
        outstanding = self._outstanding
        outstanding.difference_update(tags)
        handed = self._handed
        for tag in tags:
            handed.pop(tag, None)
        last = tags[-1]
        try:
            if not outstanding or min(outstanding) > last:
                await ch.basic_ack(last, multiple=True)
            else:
                for tag in tags[:-1]:
                    await ch.basic_ack(tag, wait=False)
                await ch.basic_ack(last)
        except GONE as e:  # the broker put them back already; they come again
            log.warning("ack on %s lost with the channel (%s); redelivery follows", self.queue, e)

    async def nack(self, delivery: Delivery, delay: float = 0.0) -> None:
        ch = self._ch
        token = delivery.token
        if ch is None or self._closed or token[0] is not ch or token[1] not in self._outstanding:
            return  # settled already, or the broker took it back with its channel
        tag = token[1]
        try:
            # a copy with the next attempt in its header (to the delay queue, or straight to
            # the group's queue), confirmed before the original is acked: a classic queue
            # cannot count redeliveries itself
            await self._owner._republish(self, [(delivery.message, delivery.attempt + 1)], delay)
            await self._pause()
            if self._ch is not ch or tag not in self._outstanding:
                return  # the channel went meanwhile: the broker took the original back
            # no yield from here to the frame (see ack)
            self._outstanding.discard(tag)
            self._handed.pop(tag, None)
            await ch.basic_ack(tag)
        except GONE as e:
            log.warning("nack on %s lost with the channel (%s); redelivery follows", self.queue, e)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._owner._subs.discard(self)
        self._disarm_idle_pause()
        ch = self._ch  # kept until the end: deliveries still arriving are counted in
        if ch is None or ch.is_closed:
            self._ch = None
            return
        with anyio.CancelScope(shield=True), anyio.move_on_after(10):
            try:
                if self._idle_task is not None:
                    await self._idle_task
                await self._stop_consumer(ch)
                # Hand unacked deliveries back as copies that carry their attempt: handed-out
                # ones count a further attempt, ones never handed out keep theirs. (A plain
                # requeue would only set the boolean `redelivered` flag.)
                buffered = [m for m in self._buffer if m.channel is ch]
                back = [(d.message, d.attempt + 1) for d in self._handed.values()]
                back += [(d.message, d.attempt) for d in self._decoded(buffered)]
                if back:
                    await self._owner._republish(self, back, 0.0)
                    # up to the newest tag we hold: we have seen every tag below it
                    await ch.basic_ack(max(self._outstanding), multiple=True)
            except (*GONE, TransportError) as e:
                log.warning("returning unacked deliveries on %s failed (%s)", self.queue, e)
            finally:
                self._ch = None
                self._buffer.clear()
                self._outstanding.clear()
                self._handed.clear()
            # what is still unacked (if the republish failed) goes back with the channel
            with contextlib.suppress(*GONE):
                await ch.close()

    async def _stop_consumer(self, ch: aiormq.Channel) -> None:
        """Cancel the consumer and return once every delivery the broker sent it has arrived.

        The ``cancel-ok`` of a live consumer proves that by itself: the queue sends it after
        its last delivery. A paused consumer needs a barrier instead: the broker answers the
        cancel of a tag it does not know at once, which proves the earlier no-wait cancel was
        done, so everything it delivered before is queued on the broker's side of the channel
        ahead of a second such cancel, whose answer comes after it. (A throw-away tag: the
        client library forgets the tag a ``cancel-ok`` names, and ours must keep its
        callback until then.)"""
        if self._tag not in ch.consumers:
            return  # never opened on this channel, or cancelled by the broker
        async with self._consumer_lock:
            live, self._consuming = self._consuming, False
            if live:
                await ch.basic_cancel(self._tag)
            else:
                for _ in range(2):
                    await ch.basic_cancel(f"herald.barrier.{new_id()}")
        await asyncio.sleep(0)  # let the deliveries read before cancel-ok run their callbacks

    def _check_open(self) -> None:
        if self._closed:
            raise TransportError(f"subscription to {self.topic!r} (group {self.group!r}) is closed")
