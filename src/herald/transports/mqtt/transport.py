"""MQTT 5 transport: ``mqtt://`` and ``mqtts://`` (aiomqtt over paho-mqtt), tested on Mosquitto 2.

URL
    ``mqtt://[user[:password]@]host[:port]?option=value&...`` (default port 1883; ``mqtts://``
    uses TLS, default port 8883, system CAs). The password is never logged: errors and
    :attr:`MqttTransport.url` show ``***``. Options:

    ``prefix`` (default empty)
        MQTT topic levels put before every Herald topic, e.g. ``prefix=herald/``.
    ``member`` (default: this host's name)
        The stable name of this consumer host; see *Groups* below.
    ``session_expiry`` (seconds, default 86400)
        How long Mosquitto keeps an offline member's session (and the messages queued in it).
    ``prefetch`` (default 1000)
        MQTT 5 Receive Maximum: how many unacked messages the broker sends one consumer.
    ``connect_timeout`` (s, default 10)
        The budget of each connect (the publisher's in :meth:`MqttTransport.connect`, and each
        subscription's), the same on every transport (:mod:`herald.transports.connecting`):
        an unreachable broker is retried with backoff within it, then one
        :class:`TransportError` names the URL, the budget and the cause. A CONNACK that
        refuses for good (bad user name or password, not authorized, banned) and a TLS
        mismatch raise :class:`~herald.transports.base.PermanentTransportError` at once.
    ``reconnect_timeout`` (s, default 30)
        A lost connection is re-opened with backoff for up to this long.
    ``max_payload`` (bytes, default MQTT's 256 MB packet limit minus 64 KiB for the envelope):
        set it to Mosquitto's ``message_size_limit`` if the broker has one.
    ``ca_file``, ``tls_insecure`` (``mqtts://`` only).

Topics
    Herald topic ``orders.created`` is the MQTT topic ``<prefix>orders.created`` (one level; Herald
    names cannot contain ``/``, ``+`` or ``#``). Transport-internal topics live under
    ``<prefix>_herald/``: ``_herald/retry/<group>/<topic>`` (redeliveries of one group) and
    ``_herald/sessions/<topic>/<group>/<client id>`` (retained bookkeeping for
    :meth:`MqttTransport.delete_topic`).

Wire format (MQTT 5 PUBLISH, QoS 1)
    payload = the message payload, byte for byte. User properties: ``x-herald-id`` (message id),
    ``x-herald-key``, ``x-herald-type`` (when set), then every header as ``name: value``
    (a header named ``x-herald-*`` travels as ``x-herald-h-x-herald-*``); the ``content_type``
    header travels as the MQTT 5 Content Type property. Redeliveries also carry
    ``x-herald-attempt`` and, for ``nack(delay)``, ``x-herald-not-before`` (Unix ms).
    A plain client's publish (any payload, no properties, MQTT 3.1.1 or 5) is consumed as a message
    with a fresh id, no type, no key (the MQTT topic when it came through a ``bind`` filter) and
    its Content Type as ``content_type``; a plain subscriber of ``<prefix><topic>`` reads Herald
    messages as ordinary payloads with user properties.

Plain topics: ``bind`` and retained messages
    ``subscribe(bind=["home/+/temp", "home/garage/#"])`` subscribes the group to MQTT topic
    filters as plain clients publish them (no ``prefix``), one shared subscription per filter,
    plus the topic itself unless a filter matches it (so Herald's publishes to the topic and
    replayed dead letters still arrive). Filters must not overlap: the broker delivers a
    message once per matching subscription. The filters are part of the client id: changing
    them starts new sessions (the old ones expire after ``session_expiry``).
    Retained messages: Mosquitto 2 sends them to shared subscriptions as well, on every
    SUBSCRIBE. Herald subscribes with MQTT 5 Retain Handling so that a group gets the retained
    messages of its filters once, on its first (slot 0) session with ``start="earliest"``;
    slots >= 1, resumed sessions and ``start="latest"`` groups never get them.

Groups
    A group is an MQTT 5 shared subscription ``$share/<group>/<topic>`` (plus the group's retry
    topic and its ``bind`` filters). Each consumer holds a *persistent session* (clean start
    off, ``session_expiry``) with the stable client id
    ``herald-<hash(prefix, topic, group[, bind])>-<member>-<slot>``; the slot is the lowest
    one free on this host (an ``flock`` in ``$XDG_RUNTIME_DIR`` or the temp dir, which the OS
    releases when the process dies). So a consumer that crashed is replaced by the next
    consumer of the group on the same host, which resumes its session and gets what it left.
    Slot 0 (the *anchor*) keeps its subscription when closed, so a group whose consumers are
    all offline still collects what is published meanwhile. Slots >= 1 leave on ``close()``:
    they unsubscribe, give back what they hold by republishing it to the group's retry topic,
    and end their session.

Acks and redelivery
    Manual MQTT acks: a PUBACK is sent only on :meth:`~MqttSubscription.ack`. ``nack(delay)``
    republishes the message to the group's retry topic with ``attempt + 1`` and a not-before time,
    then acks the original; the consumer that receives it holds it (unacked) until it is due.
    So the delay lives in the broker and outlives the nacking process. A message redelivered
    after a lost connection (MQTT DUP) counts as a further attempt only if it had been handed to
    the application (the slot file keeps a journal of those).

What MQTT (Mosquitto 2) cannot promise — read before choosing it
    * No replay (``Features.replay`` is False): a message published while a group has never
      subscribed is dropped by the broker; ``start`` only decides whether the group's first
      session takes the retained messages (see above).
    * Shared-subscription messages are assigned to a member when published (round robin), also
      to an offline member's session: they wait for *that* session. A member that crashed and is
      never restarted with the same ``member`` name and slot keeps its share until
      ``session_expiry``; then Mosquitto discards it. Give each host a stable ``member`` name.
    * Mosquitto keeps at most ``max_queued_messages`` (default 1000) per session beyond the
      in-flight window and *drops* QoS 1 messages past it: configure ``max_queued_messages 0``
      (or a large value) on any broker holding backlogs.
    * Durability: PUBACK means the broker has the message in memory. Mosquitto writes its store
      at shutdown and every ``autosave_interval`` (default 1800 s): a clean restart keeps queued
      messages and sessions, a broker crash loses what was not saved yet.
    * An ack is a PUBACK, which the broker does not confirm; if the connection drops before the
      broker reads it, the message is delivered again (at-least-once). A consumer's ``close()``
      first waits for one round trip (an UNSUBSCRIBE of a filter it never subscribed), so acks
      given before a close are not lost to the close itself.
    * Messages held back for ``nack(delay)`` occupy the consumer's ``prefetch`` window.
    * Order: per MQTT topic and publishing connection; one consumer sees one publisher's messages
      in order. Keys are not used for routing (MQTT has no partitions).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, ClassVar

import anyio
from paho.mqtt import client as paho

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
    unsupported,
    validate_name,
)
from herald.transports.mqtt import peek
from herald.transports.mqtt.connection import Connection, ConnectionLost, Item, reconnect
from herald.transports.mqtt.filters import group_filters
from herald.transports.mqtt.options import MqttOptions, parse_url
from herald.transports.mqtt.slots import acquire_slot, client_id
from herald.transports.mqtt.subscription import MqttSubscription
from herald.transports.mqtt.wire import encode_properties

__all__ = ["MqttSubscription", "MqttTransport"]

log = logging.getLogger(__name__)

#: Seconds delete_topic waits after the last retained registry entry arrives.
_REGISTRY_IDLE = 0.3
_NO_LISTING = (
    "MQTT broker {url} cannot list {what}: MQTT has no request that lists topics or "
    "subscriptions (a broker knows a topic only while someone publishes or subscribes to it)"
)


class MqttTransport(Transport):
    """Herald over an MQTT 5 broker. One connection for publishing, one per subscription."""

    schemes: ClassVar[tuple[str, ...]] = ("mqtt", "mqtts")

    def __init__(self, options: MqttOptions) -> None:
        self._o = options
        self.features = Features(
            persistent=True,  # QoS 1 + persistent sessions; see "What MQTT cannot promise"
            cross_process=True,  # shared subscriptions
            ordered_per_key=True,  # one publisher connection -> one consumer keeps order
            native_delay=True,  # the not-before time travels with the message in the broker
            replay=False,  # MQTT drops what no subscription (session) wanted
            headers=True,  # MQTT 5 user properties
            max_payload=options.max_payload,
            # Mosquitto's default max_queued_messages; raise it in mosquitto.conf (0 = none)
            max_backlog=1000,
        )
        self._pub: Connection | None = None
        self._pub_lock = anyio.Lock()
        self._subs: set[MqttSubscription] = set()
        self._closed = False

    @classmethod
    def from_url(cls, url: str) -> MqttTransport:
        return cls(parse_url(url))

    @property
    def url(self) -> str:
        return self._o.url

    @property
    def options(self) -> MqttOptions:
        return self._o

    def mqtt_topic(self, topic: str) -> str:
        """The MQTT topic a Herald topic is published to."""
        return self._o.prefix + topic

    def retry_topic(self, topic: str, group: str) -> str:
        """The MQTT topic of ``group``'s redeliveries on ``topic``."""
        return f"{self._o.prefix}_herald/retry/{group}/{topic}"

    def _registry_topic(self, topic: str, group: str, identifier: str) -> str:
        return f"{self._o.prefix}_herald/sessions/{topic}/{group}/{identifier}"

    # --- lifecycle -------------------------------------------------------------------------

    async def connect(self) -> None:
        """Open the publishing connection within ``connect_timeout``; TransportError (URL
        redacted) if the broker stays unreachable, PermanentTransportError if it refuses.
        After :meth:`close` it connects again."""
        self._closed = False
        if self._pub is None:
            await self._publisher()

    async def close(self) -> None:
        self._closed = True
        for sub in list(self._subs):
            await sub.close()
        if self._pub is not None:
            pub, self._pub = self._pub, None
            with anyio.CancelScope(shield=True):
                await pub.close()

    def _new_conn(self, identifier: str | None = None, **kw: Any) -> Connection:
        ident = identifier or f"herald-pub-{uuid.uuid4().hex[:16]}"
        kw.setdefault("session_expiry", 0)
        kw.setdefault("clean_start", True)
        return Connection(self._o, ident, **kw)

    async def _publisher(self) -> Connection:
        if self._closed:
            raise TransportError(f"MQTT transport {self.url} is closed")
        pub = self._pub
        if pub is not None and pub.alive:
            return pub
        async with self._pub_lock:
            if self._pub is None or not self._pub.alive:
                if self._pub is not None:
                    await self._pub.close()
                    log.warning("MQTT publisher connection to %s lost; reconnecting", self.url)
                    conn = await reconnect(self._o, self._new_conn)
                else:
                    conn = self._new_conn()
                    await conn.open()
                self._pub = conn
            return self._pub

    async def publish(self, topic: str, messages: Sequence[Message]) -> None:
        """QoS 1 publish of the batch; returns once the broker PUBACKed every message. A
        lost connection is re-opened and the batch sent again (duplicates possible)."""
        validate_name("topic", topic)
        limit = self._o.max_payload
        for m in messages:
            if len(m.payload) > limit:
                raise TransportError(
                    f"payload of {len(m.payload)} bytes exceeds max_payload={limit} on {self.url}"
                )
        mqtt_topic = self.mqtt_topic(topic)
        items = [(mqtt_topic, m.payload, encode_properties(m), False) for m in messages]
        await self._publish_items(items)

    async def _publish_items(self, items: Sequence[Item]) -> None:
        deadline = time.monotonic() + self._o.reconnect_timeout
        while True:
            conn = await self._publisher()
            try:
                await conn.publish(items)
                return
            except ConnectionLost:
                if time.monotonic() > deadline:
                    raise TransportError(
                        f"MQTT broker {self.url} connection lost; gave up after "
                        f"{self._o.reconnect_timeout:g}s"
                    ) from None

    async def subscribe(
        self,
        topic: str,
        group: str,
        *,
        start: Start = "earliest",
        bind: Sequence[str] = (),
        source: str | None = None,
    ) -> Subscription:
        """Join ``group``: resume (or create) this host's lowest free persistent session of the
        group. MQTT cannot replay (``replay=False``); ``start="earliest"`` takes the retained
        messages of the group's filters once, when the group's first session is made.

        ``bind`` takes MQTT topic filters (``home/+/temp``, ``home/#``), used as plain clients
        publish them (no ``prefix``): the group holds one shared subscription per filter, and
        one on the topic itself unless a filter matches it. Filters that overlap are a
        ``ValueError`` (the broker would deliver a message once per matching subscription).
        Changing a group's filters makes new sessions (the old ones expire after
        ``session_expiry``). ``source`` raises ``ValueError``: MQTT has nothing but topics."""
        validate_name("topic", topic)
        validate_name("group", group)
        given, source = check_topology(bind, source)
        if source is not None:
            raise unsupported(
                "mqtt",
                "source",
                "MQTT has no objects besides topics: name the topic, or bind= the filters "
                "plain clients publish to",
            )
        filters = group_filters(self.mqtt_topic(topic), given)
        if self._closed:
            raise TransportError(f"MQTT transport {self.url} is closed")
        base = client_id(self._o.prefix, topic, group, self._o.member, 0, bind=given)[:-2]
        slot = acquire_slot(base)
        # Retained messages: once per group, to its first (anchor) session, and never to a
        # group joining at "latest" (Mosquitto sends them to shared subscriptions too)
        retained = slot.index == 0 and start == "earliest"
        sub = MqttSubscription(
            self, topic, group, f"{base}-{slot.index}", slot, filters, retained=retained
        )
        try:
            await sub._start()
        except BaseException:
            slot.release()
            raise
        self._subs.add(sub)
        return sub

    def peek(
        self, topic: str, *, last: int = 0
    ) -> AbstractAsyncContextManager[AsyncIterator[Message]]:
        """A plain subscription on a clean session of its own (see
        :mod:`herald.transports.mqtt.peek`); ``last`` is refused (no replay)."""
        check_peek(self, topic, last)
        if self._closed:
            raise TransportError(f"MQTT transport {self.url} is closed")
        return peek.peek(self, topic)

    async def list_topics(self) -> list[TopicInfo]:
        raise TransportError(_NO_LISTING.format(what="topics", url=self.url))

    async def list_groups(self, topic: str) -> list[GroupInfo]:
        raise TransportError(_NO_LISTING.format(what="groups", url=self.url))

    async def delete_topic(self, topic: str) -> None:
        """Remove what this transport created for ``topic`` and ``topic.*`` (dead-letter
        topics): the persistent sessions of every group member (live ones are disconnected),
        retained registry entries, and retained messages on the topics. For tests and tooling."""
        validate_name("topic", topic)
        found: dict[str, tuple[str, str, str]] = {}
        last = [time.monotonic()]
        root = f"{self._o.prefix}_herald/sessions/"

        def on_message(m: paho.MQTTMessage) -> None:
            parts = m.topic[len(root) :].split("/")
            if len(parts) == 3 and (parts[0] == topic or parts[0].startswith(topic + ".")):
                found[m.topic] = (parts[0], parts[1], parts[2])
            last[0] = time.monotonic()

        conn = self._new_conn(on_message=on_message)
        await conn.open()
        try:
            conn.paho.manual_ack_set(False)
            # The topic's own entries first: Mosquitto sends one client at most
            # max_queued_messages (default 1000) retained messages beyond its in-flight window
            # and drops the rest, so on a busy broker the wide scan (for dead-letter topics
            # ``topic.*``, which no MQTT wildcard selects) may miss some.
            await conn._client.subscribe(root + topic + "/#", qos=1)
            await conn._client.subscribe(root + "+/#", qos=1)
            while time.monotonic() - last[0] < _REGISTRY_IDLE:
                await anyio.sleep(0.05)
            clears: list[Item] = []
            for reg, (t, group, ident) in found.items():
                wipe = self._new_conn(ident, session_expiry=0, clean_start=True)
                await wipe.open()
                await wipe.close()
                clears += [(reg, b"", None, True), (self.retry_topic(t, group), b"", None, True)]
            clears.append((self.mqtt_topic(topic), b"", None, True))
            await conn.publish(clears)
        finally:
            await conn.close()
