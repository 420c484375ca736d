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
    ``connect_timeout`` (s, default 5), ``connect_retries`` (default 3), ``reconnect_timeout``
    (s, default 30): an unreachable broker fails :meth:`MqttTransport.connect` with a
    :class:`TransportError` after ``connect_retries`` attempts with backoff; a lost
    connection is re-opened with backoff for up to ``reconnect_timeout`` seconds.
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
    with a fresh id, no key/type, and its Content Type as ``content_type``; a plain subscriber
    of ``<prefix><topic>`` reads Herald messages as ordinary payloads with user properties.

Groups
    A group is an MQTT 5 shared subscription ``$share/<group>/<topic>`` (plus the group's retry
    topic). Each consumer holds a *persistent session* (clean start off, ``session_expiry``) with
    the stable client id ``herald-<hash(prefix, topic, group)>-<member>-<slot>``; the slot is the
    lowest one free on this host (an ``flock`` in ``$XDG_RUNTIME_DIR`` or the temp dir, which
    the OS releases when the process dies). So a consumer that crashed is replaced by the next
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
      subscribed is dropped by the broker; ``start`` has no effect. Retained messages are not
      sent to shared subscriptions either.
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

import asyncio
import contextlib
import heapq
import itertools
import logging
import math
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import aiomqtt
import anyio
from paho.mqtt import client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from herald.message import Message
from herald.transports._mqtt_support import (
    Incoming,
    MqttOptions,
    Slot,
    acquire_slot,
    client_id,
    decode_message,
    encode_properties,
    now_ms,
    parse_url,
)
from herald.transports.base import (
    Delivery,
    Features,
    Start,
    Subscription,
    Transport,
    TransportError,
    validate_name,
)

__all__ = ["MqttSubscription", "MqttTransport"]

log = logging.getLogger(__name__)

#: Seconds a leaving consumer waits for the broker to stop sending after its UNSUBSCRIBE.
_DRAIN_IDLE = 0.15
_DRAIN_MAX = 3.0
#: Seconds delete_topic waits after the last retained registry entry arrives.
_REGISTRY_IDLE = 0.3

Item = tuple[str, bytes, Properties | None, bool]  # topic, payload, properties, retain


class _Lost(Exception):
    """The connection dropped; the caller reconnects."""


class _Batch:
    """PUBACKs awaited for one publish call."""

    __slots__ = ("error", "future", "remaining")

    def __init__(self, count: int) -> None:
        self.remaining = count
        self.error: str | None = None
        self.future: asyncio.Future[None] = asyncio.get_running_loop().create_future()


class _Conn:
    """One MQTT 5 connection: aiomqtt runs the socket on the event loop; the paho client under it
    gives what aiomqtt 2.5 does not expose (manual acks, DUP flags, batched PUBACK waits)."""

    def __init__(
        self,
        opts: MqttOptions,
        identifier: str,
        *,
        session_expiry: int,
        clean_start: bool,
        receive_max: int | None = None,
        on_message: Callable[[paho.MQTTMessage], None] | None = None,
    ) -> None:
        self._opts = opts
        self.identifier = identifier
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = session_expiry
        if receive_max is not None:
            props.ReceiveMaximum = receive_max
        self._client = aiomqtt.Client(
            opts.host,
            opts.port,
            username=opts.username,
            password=opts.password,
            identifier=identifier,
            protocol=aiomqtt.ProtocolVersion.V5,
            clean_start=clean_start,
            properties=props,
            tls_context=opts.ssl_context(),
            timeout=opts.connect_timeout,
            logger=log,
        )
        self.paho: paho.Client = self._client._client
        self.paho.manual_ack_set(True)  # before CONNECT: resent messages must not be auto-acked
        self.paho.max_inflight_messages_set(1000)
        self.paho.on_publish = self._on_publish
        # aiomqtt registers the socket writer with call_soon_threadsafe; when the socket closes
        # before that runs (a flush() wrote everything, then a quick close), asyncio raises on
        # the dead fd. These hooks do the same, but tolerate a closed socket and unregister the
        # writer on close so a reused fd number never meets a stale registration.
        self._loop = asyncio.get_running_loop()
        self.paho.on_socket_register_write = self._register_write
        aiomqtt_close: Any = self.paho.on_socket_close

        def on_socket_close(client: Any, userdata: Any, sock: Any) -> None:
            self._loop.call_soon_threadsafe(self._remove_writer, sock.fileno())
            aiomqtt_close(client, userdata, sock)

        self.paho.on_socket_close = on_socket_close
        if on_message is not None:
            self.paho.on_message = lambda _c, _u, m: on_message(m)
        self._waiting: dict[int, _Batch] = {}
        self._open = False
        #: PUBACKs were written since the broker last proved it had read them (see close())
        self._acks_unconfirmed = False
        #: A filter this connection never subscribes to; unsubscribing is a no-op round trip.
        self._barrier = f"{opts.prefix}_herald/barrier"

    def _register_write(self, client: Any, _u: Any, sock: Any) -> None:
        fd = sock.fileno()

        def write() -> None:
            try:
                client.loop_write()
            except Exception as exc:  # a broken connection; the reader side reports it too
                fut = self._client._disconnected
                if not fut.done():
                    fut.set_exception(exc)

        def add() -> None:
            if fd >= 0 and self.paho.socket() is sock:
                with contextlib.suppress(OSError, ValueError):  # closed meanwhile
                    self._loop.add_writer(fd, write)

        self._loop.call_soon_threadsafe(add)

    def _remove_writer(self, fd: int) -> None:
        if fd >= 0:
            with contextlib.suppress(OSError, ValueError):
                self._loop.remove_writer(fd)

    @property
    def alive(self) -> bool:
        return self._open and not self._client._disconnected.done()

    async def open(self) -> None:
        """Connect, trying ``connect_retries`` times with backoff; TransportError if it fails."""
        o = self._opts
        error = ""
        for attempt in range(o.connect_retries):
            if attempt:
                await anyio.sleep(min(0.2 * 2**attempt, 2.0))
            try:
                with anyio.fail_after(o.connect_timeout + 1):
                    await self._client.__aenter__()
                self._open = True
                return
            except (aiomqtt.MqttError, TimeoutError, OSError) as e:
                error = str(e) or type(e).__name__
        raise TransportError(
            f"cannot connect to MQTT broker {o.url} after {o.connect_retries} attempts: {error}"
        )

    async def close(self) -> None:
        """Disconnect, once the broker has read the PUBACKs written before (``_confirm_acks``)."""
        if not self._open:
            return
        await self._confirm_acks()
        if not self._open:  # closed by a concurrent call meanwhile
            return
        self._open = False
        for batch in self._waiting.values():
            if not batch.future.done():
                batch.future.set_exception(_Lost())
        self._waiting.clear()
        fut = self._client._disconnected
        if fut.done() and not fut.cancelled():
            fut.exception()  # mark a lost connection's error as seen (asyncio warns otherwise)
        try:
            with anyio.move_on_after(self._opts.connect_timeout):
                await self._client.__aexit__(None, None, None)
        except (aiomqtt.MqttError, OSError):
            pass  # already gone: nothing to say goodbye to

    def ack(self, packet_ids: Sequence[int]) -> None:
        """Send PUBACKs for ``packet_ids`` (of this connection) and write them to the socket."""
        if not packet_ids or not self.alive:
            return
        for pid in packet_ids:
            self.paho.ack(pid, 1)
        self._acks_unconfirmed = True
        self.flush()

    async def _confirm_acks(self) -> None:
        """Wait until the broker has read every PUBACK written so far, before DISCONNECT.

        Written is not enough: paho closes the socket right after the DISCONNECT, and when the
        broker's PUBLISHes are still unread on our side the kernel answers with a TCP RST.
        Mosquitto's next write to us then fails (ECONNRESET) and it drops the connection
        without reading the PUBACKs and DISCONNECT still queued on its side, so the session
        keeps those messages and redelivers them, acked, on its next resume. The broker reads a
        connection's packets in order, so the reply to a later request proves the PUBACKs were
        processed; UNSUBSCRIBE of a filter never subscribed has no other effect.
        """
        if not self._acks_unconfirmed or not self.alive:
            return
        self._acks_unconfirmed = False
        barrier = asyncio.ensure_future(self._client.unsubscribe(self._barrier, timeout=math.inf))
        confirmed = False
        try:
            await asyncio.wait(
                [barrier, self._client._disconnected],
                timeout=self._opts.connect_timeout,
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            if barrier.done():
                confirmed = not barrier.cancelled() and barrier.exception() is None
            else:
                barrier.cancel()
        if not confirmed:
            log.warning(
                "MQTT broker %s did not confirm the last acks of %s before the close; "
                "their messages may be delivered again",
                self._opts.url,
                self.identifier,
            )

    def flush(self) -> None:
        """Write queued packets (PUBACKs) to the socket now, not on the next loop turn."""
        if self.alive:
            with contextlib.suppress(OSError):  # the reader notices the broken connection
                self.paho.loop_write()

    def _on_publish(self, _c: Any, _u: Any, mid: int, reason: Any, _p: Any) -> None:
        batch = self._waiting.pop(mid, None)
        if batch is None or batch.future.done():
            return
        if getattr(reason, "is_failure", False):
            batch.error = str(reason)
        batch.remaining -= 1
        if batch.remaining == 0:
            batch.future.set_result(None)

    async def publish(self, items: Sequence[Item]) -> None:
        """Publish at QoS 1 and wait for every PUBACK. ``_Lost`` if the connection drops,
        ``TransportError`` if the broker refuses a message."""
        if not items:
            return
        if not self.alive:
            raise _Lost()
        batch = _Batch(len(items))
        publish = self.paho.publish
        for topic, payload, props, retain in items:
            info = publish(topic, payload, 1, retain, props)
            if info.rc != paho.MQTT_ERR_SUCCESS:
                batch.remaining -= 1  # not sent; the whole batch is retried
                raise _Lost()
            self._waiting[info.mid] = batch
        disconnected = self._client._disconnected
        await asyncio.wait([batch.future, disconnected], return_when=asyncio.FIRST_COMPLETED)
        if not batch.future.done():
            raise _Lost()
        batch.future.result()
        if batch.error is not None:
            raise TransportError(f"MQTT broker {self._opts.url} refused a message: {batch.error}")


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
        self._pub: _Conn | None = None
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
        """Open the publishing connection; TransportError (URL redacted) if the broker cannot
        be reached after ``connect_retries`` attempts."""
        if self._closed:
            raise TransportError(f"MQTT transport {self.url} is closed")
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

    def _new_conn(self, identifier: str | None = None, **kw: Any) -> _Conn:
        ident = identifier or f"herald-pub-{uuid.uuid4().hex[:16]}"
        kw.setdefault("session_expiry", 0)
        kw.setdefault("clean_start", True)
        return _Conn(self._o, ident, **kw)

    async def _publisher(self) -> _Conn:
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
            except _Lost:
                if time.monotonic() > deadline:
                    raise TransportError(
                        f"MQTT broker {self.url} connection lost; gave up after "
                        f"{self._o.reconnect_timeout:g}s"
                    ) from None

    async def subscribe(self, topic: str, group: str, *, start: Start = "earliest") -> Subscription:
        """Join ``group``: resume (or create) this host's lowest free persistent session of the
        group. ``start`` is accepted for the contract but MQTT cannot replay (``replay=False``)."""
        validate_name("topic", topic)
        validate_name("group", group)
        if self._closed:
            raise TransportError(f"MQTT transport {self.url} is closed")
        base = client_id(self._o.prefix, topic, group, self._o.member, 0)[:-2]
        slot = acquire_slot(base)
        sub = MqttSubscription(self, topic, group, f"{base}-{slot.index}", slot)
        try:
            await sub._start()
        except BaseException:
            slot.release()
            raise
        self._subs.add(sub)
        return sub

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


async def reconnect(opts: MqttOptions, make: Callable[[], _Conn]) -> _Conn:
    """Open a fresh connection with backoff for up to ``reconnect_timeout`` seconds."""
    deadline = time.monotonic() + opts.reconnect_timeout
    delay = 0.1
    while True:
        conn = make()
        try:
            await conn.open()
            return conn
        except TransportError as e:
            if time.monotonic() + delay > deadline:
                raise TransportError(
                    f"MQTT broker {opts.url} unreachable for {opts.reconnect_timeout:g}s: {e}"
                ) from None
        await anyio.sleep(delay)
        delay = min(delay * 2, 2.0)


_tiebreak = itertools.count()


class MqttSubscription(Subscription):
    """One consumer of a group: a persistent MQTT session in a shared subscription."""

    def __init__(
        self, transport: MqttTransport, topic: str, group: str, identifier: str, slot: Slot
    ) -> None:
        self.topic = topic
        self.group = group
        self._t = transport
        self._id = identifier
        self._slot = slot
        self._filters = [
            f"$share/{group}/{transport.mqtt_topic(topic)}",
            f"$share/{group}/{transport.retry_topic(topic, group)}",
        ]
        self._conn: _Conn | None = None
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

    def _make_conn(self) -> _Conn:
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
        except (_Lost, aiomqtt.MqttError) as e:
            await conn.close()
            raise TransportError(f"cannot subscribe on MQTT broker {self._t.url}: {e}") from None

    async def _subscribe(self, conn: _Conn) -> None:
        await conn._client.subscribe([(f, SubscribeOptions(qos=1)) for f in self._filters])

    async def _ensure_connected(self) -> _Conn:
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
            inc = decode_message(self.topic, bytes(m.payload), m.properties)
            if inc.not_before > now:
                heapq.heappush(delayed, (inc.not_before, next(_tiebreak), g, m, inc))
                continue
            out.append(self._delivery(m, inc))
        if out:
            self._slot.record([(d.message.id, d.attempt) for d in out])
        return out

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
        except _Lost:
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

    async def _leave(self, conn: _Conn) -> None:
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
                inc = decode_message(self.topic, bytes(m.payload), m.properties)
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
