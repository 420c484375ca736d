"""One consumer of a group on MQTT: its persistent session, fetch with delayed redelivery,
ack/nack, and leaving the group on close.

Part of :mod:`herald.transports.mqtt.transport` (whose docstring describes groups, acks and
redelivery); split out to keep one concept per file. The transport creates :class:`MqttSubscription`
objects."""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import time
from collections import deque
from collections.abc import Sequence
from typing import Any, Protocol

import aiomqtt
import anyio
from paho.mqtt import client as paho
from paho.mqtt.subscribeoptions import SubscribeOptions

from herald.transports.base import Delivery, Subscription, TransportError
from herald.transports.mqtt.connection import Connection, ConnectionLost, reconnect
from herald.transports.mqtt.options import MqttOptions
from herald.transports.mqtt.slots import Slot
from herald.transports.mqtt.wire import Incoming, decode_message, encode_properties, now_ms

__all__ = ["MqttSubscription", "Owner"]

log = logging.getLogger("herald.transports.mqtt")

#: Seconds a leaving consumer waits for the broker to stop sending after its UNSUBSCRIBE.
_DRAIN_IDLE = 0.15
_DRAIN_MAX = 3.0

_tiebreak = itertools.count()


class Owner(Protocol):
    """What a subscription uses of the transport that made it. The transport module imports
    this one, so this one names these members instead of importing the transport class."""

    @property
    def url(self) -> str: ...

    @property
    def options(self) -> MqttOptions: ...

    @property
    def _subs(self) -> set[MqttSubscription]:
        """The transport's open subscriptions; a closing one removes itself."""
        ...

    def mqtt_topic(self, topic: str) -> str: ...

    def retry_topic(self, topic: str, group: str) -> str: ...

    def _registry_topic(self, topic: str, group: str, identifier: str) -> str: ...

    def _new_conn(self, identifier: str | None = None, **kw: Any) -> Connection:
        """A new (not yet connected) connection to the broker with these options."""
        ...


class MqttSubscription(Subscription):
    """One consumer of a group: a persistent MQTT session in a shared subscription."""

    def __init__(
        self,
        transport: Owner,
        topic: str,
        group: str,
        identifier: str,
        slot: Slot,
        filters: Sequence[str],
        *,
        retained: bool,
    ) -> None:
        self.topic = topic
        self.group = group
        self._t = transport
        self._id = identifier
        self._slot = slot
        retry = transport.retry_topic(topic, group)
        self._filters = [f"$share/{group}/{f}" for f in (*filters, retry)]
        # the MQTT topics whose messages carry no key of their own to take from the topic
        self._unkeyed = {transport.mqtt_topic(topic), retry}
        # MQTT 5 Retain Handling: 1 = retained messages only when the subscription is new
        # (a resumed session already had them), 2 = never
        self._retain_handling = 1 if retained else 2
        self._conn: Connection | None = None
        self._gen = 0  # connection generation: a packet id means nothing on another one
        self._ready: deque[tuple[int, paho.MQTTMessage]] = deque()
        self._delayed: list[tuple[float, int, int, paho.MQTTMessage, Incoming]] = []
        #: handed out, not acked/nacked yet: token (gen, packet id) -> delivery
        self._inflight: dict[tuple[int, int], Delivery] = {}
        self._wake = anyio.Event()
        self._closed = False

    # --- connection ------------------------------------------------------------------------

    def _on_message(self, m: paho.MQTTMessage) -> None:
        self._ready.append((self._gen, m))
        self._wake.set()

    def _make_conn(self) -> Connection:
        return self._t._new_conn(
            self._id,
            session_expiry=self._t.options.session_expiry,
            clean_start=False,
            receive_max=self._t.options.prefetch,
            on_message=self._on_message,
        )

    async def _start(self) -> None:
        conn = self._make_conn()
        await conn.open()
        self._conn = conn
        try:
            await self._subscribe(conn)
            reg = self._t._registry_topic(self.topic, self.group, self._id)
            await conn.publish([(reg, self._id.encode(), None, True)])
        except (ConnectionLost, aiomqtt.MqttError) as e:
            await conn.close()
            raise TransportError(f"cannot subscribe on MQTT broker {self._t.url}: {e}") from None

    async def _subscribe(self, conn: Connection) -> None:
        options = SubscribeOptions(qos=1, retainHandling=self._retain_handling)
        await conn._client.subscribe([(f, options) for f in self._filters])

    async def _ensure_connected(self) -> Connection:
        conn = self._conn
        if conn is not None and conn.alive:
            return conn
        if conn is not None:
            await conn.close()
            log.warning(
                "MQTT consumer %s lost its connection to %s; reconnecting", self._id, self._t.url
            )
        # Whatever the old connection held is redelivered (DUP) on the resumed session.
        self._gen += 1
        self._ready.clear()
        self._delayed.clear()
        self._conn = None
        conn = await reconnect(self._t.options, self._make_conn)
        self._conn = conn
        with contextlib.suppress(aiomqtt.MqttError):  # dropped again: the next fetch reconnects
            await self._subscribe(conn)  # idempotent on a resumed session; needed on a new one
        return conn

    # --- consuming -------------------------------------------------------------------------

    async def fetch(self, max_messages: int, timeout: float) -> list[Delivery]:
        if max_messages < 1:
            raise ValueError(f"max_messages must be >= 1, not {max_messages!r}")
        deadline = time.monotonic() + max(0.0, timeout)
        await anyio.lowlevel.checkpoint()
        while True:
            self._check_open()
            await self._ensure_connected()
            out = self._take(max_messages)  # no await from here to return: nothing is lost
            if out:
                return out
            now = time.monotonic()
            wait = deadline - now
            if wait <= 0:
                return []
            if self._delayed:
                wait = min(wait, max(0.0, self._delayed[0][0] - time.time()))
            self._wake = anyio.Event()
            with anyio.move_on_after(min(wait, 0.5)):  # 0.5: notice a dropped connection
                await self._wake.wait()

    def _take(self, n: int) -> list[Delivery]:
        out: list[Delivery] = []
        now = time.time()
        gen = self._gen
        delayed = self._delayed
        while delayed and delayed[0][0] <= now and len(out) < n:
            _, _, g, m, inc = heapq.heappop(delayed)
            if g == gen:
                out.append(self._delivery(m, inc))
        ready = self._ready
        while ready and len(out) < n:
            g, m = ready.popleft()
            if g != gen:
                continue
            inc = self._decode(m)
            if inc.not_before > now:
                heapq.heappush(delayed, (inc.not_before, next(_tiebreak), g, m, inc))
                continue
            out.append(self._delivery(m, inc))
        if out:
            self._slot.record([(d.message.id, d.attempt) for d in out])
        return out

    def _decode(self, m: paho.MQTTMessage) -> Incoming:
        # a plain message from a bind filter has its MQTT topic as key
        subject = m.topic if m.topic not in self._unkeyed else None
        return decode_message(self.topic, bytes(m.payload), m.properties, subject=subject)

    def _delivery(self, m: paho.MQTTMessage, inc: Incoming) -> Delivery:
        attempt = inc.attempt
        if m.dup:
            seen = self._slot.handed_out.get(inc.message.id)
            if seen is not None:  # it reached the application before: one more attempt
                attempt = max(attempt, seen + 1)
        token = (self._gen, m.mid)
        d = Delivery(inc.message, attempt, token)
        self._inflight[token] = d
        return d

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        """Send PUBACKs (written to the socket before returning). A delivery from before a
        reconnect cannot be acked: the broker redelivers it (at-least-once)."""
        packet_ids: list[int] = []
        for d in deliveries:
            if self._inflight.pop(d.token, None) is None:
                continue
            self._slot.settled(d.message.id)
            if d.token[0] == self._gen:
                packet_ids.append(d.token[1])
        if self._conn is not None:
            self._conn.ack(packet_ids)

    async def nack(self, delivery: Delivery, delay: float = 0.0) -> None:
        """Republish to the group's retry topic with ``attempt + 1`` and a not-before time,
        then ack the original: the delay is held by the broker, not by this process."""
        if not (delay >= 0 and delay < float("inf")):
            raise ValueError(f"nack delay must be a finite number >= 0, not {delay!r}")
        self._check_open()
        if delivery.token not in self._inflight:
            return
        not_before = now_ms() + int(delay * 1000) if delay > 0 else None
        await self._give_back([(delivery, delivery.attempt + 1, not_before)])

    async def _give_back(self, entries: list[tuple[Delivery, int, int | None]]) -> None:
        conn = self._conn
        if conn is None or not conn.alive:
            return  # the broker redelivers them on the resumed session
        retry = self._t.retry_topic(self.topic, self.group)
        items = [
            (
                retry,
                d.message.payload,
                encode_properties(d.message, attempt=a, not_before_ms=nb),
                False,
            )
            for d, a, nb in entries
        ]
        try:
            await conn.publish(items)
        except ConnectionLost:
            return  # originals stay unacked: redelivered on the resumed session
        await self.ack([d for d, _, _ in entries])

    async def close(self) -> None:
        """Leave the group. Slot 0 keeps its session and subscription (the group keeps
        collecting while offline) and leaves unacked deliveries in it, redelivered to the next
        consumer taking slot 0. Other slots unsubscribe, republish what they hold to the group's
        retry topic, ack it, and end their session. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._t._subs.discard(self)
        self._wake.set()
        conn = self._conn
        with anyio.CancelScope(shield=True):
            try:
                if conn is not None and conn.alive and self._slot.index > 0:
                    await self._leave(conn)
            finally:
                if conn is not None:
                    await conn.close()
                self._slot.release()

    async def _leave(self, conn: Connection) -> None:
        try:
            await conn._client.unsubscribe(self._filters)
        except aiomqtt.MqttError:
            return
        # Messages routed to us before the UNSUBSCRIBE keep arriving for a moment.
        started = time.monotonic()
        seen = -1
        while time.monotonic() - started < _DRAIN_MAX:
            count = len(self._ready)
            if count == seen:
                break
            seen = count
            await anyio.sleep(_DRAIN_IDLE)
        held: list[tuple[Delivery, int, int | None]] = [
            (d, d.attempt + 1, None) for tok, d in self._inflight.items() if tok[0] == self._gen
        ]
        for g, m in self._ready:
            if g == self._gen:
                inc = self._decode(m)
                d = self._delivery(m, inc)
                nb = int(inc.not_before * 1000) if inc.not_before else None
                held.append((d, d.attempt, nb))
        for _, _, g, m, inc in self._delayed:
            if g == self._gen:
                held.append((self._delivery(m, inc), inc.attempt, int(inc.not_before * 1000)))
        self._ready.clear()
        self._delayed.clear()
        if held:
            await self._give_back(held)
        if not self._inflight:
            # End the session: nothing is left in it that the group still needs.
            await conn.close()
            wipe = self._t._new_conn(self._id, session_expiry=0, clean_start=True)
            try:
                await wipe.open()
            finally:
                await wipe.close()

    def _check_open(self) -> None:
        if self._closed:
            raise TransportError(f"subscription {self.group!r} on {self.topic!r} is closed")
