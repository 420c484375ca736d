"""The MQTT 5 connection of :mod:`herald.transports.mqtt.transport`: connect with retries, QoS 1
publish awaiting every PUBACK, manual acks, and the ack confirmation round trip before DISCONNECT.

Part of :mod:`herald.transports.mqtt.transport` (whose docstring describes the semantics); split out
to keep one concept per file. The transport and its subscriptions each hold their own
:class:`Connection`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import aiomqtt
import anyio
from paho.mqtt import client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from herald.transports.base import PermanentTransportError, TransportError
from herald.transports.connecting import Endpoint, connect_within, load_tls
from herald.transports.mqtt.options import MqttOptions

__all__ = ["ANSWER_TIMEOUT", "Connection", "ConnectionLost", "Item", "reconnect"]

log = logging.getLogger("herald.transports.mqtt")
#: what aiomqtt and paho log for a connection (demoted to DEBUG while connecting)
_client_log = logging.getLogger("herald.transports.mqtt.client")

#: Seconds an answer from the broker (SUBACK, UNSUBACK, the acks barrier, DISCONNECT) is awaited.
ANSWER_TIMEOUT = 5.0
#: CONNACK reason codes (MQTT 5) that retrying cannot change, and what to do about them
_REFUSED = {
    0x81: "the broker could not parse the CONNECT",
    0x82: "protocol error",
    0x84: "the broker does not speak MQTT 5",
    0x85: "client identifier refused",
    0x86: "check the user name and password in the URL",
    0x87: "wrong user name or password, or the user may not connect: check both",
    0x8A: "this client is banned",
    0x8C: "authentication method refused",
    0x95: "packet too large",
    0x9C: "the broker asks to use another server",
    0x9D: "the broker moved",
}

Item = tuple[str, bytes, Properties | None, bool]  # topic, payload, properties, retain


class ConnectionLost(Exception):
    """The connection dropped; the caller reconnects."""


class _Batch:
    """PUBACKs awaited for one publish call."""

    __slots__ = ("error", "future", "remaining")

    def __init__(self, count: int) -> None:
        self.remaining = count
        self.error: str | None = None
        self.future: asyncio.Future[None] = asyncio.get_running_loop().create_future()


class Connection:
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
        self._props = props
        self._clean_start = clean_start
        self._on_message = on_message
        self._tls = load_tls("MQTT", opts.url, opts.ssl_context)
        self._loop = asyncio.get_running_loop()
        self._make_client(ANSWER_TIMEOUT)
        self._waiting: dict[int, _Batch] = {}
        self._open = False
        #: PUBACKs were written since the broker last proved it had read them (see close())
        self._acks_unconfirmed = False
        #: A filter this connection never subscribes to; unsubscribing is a no-op round trip.
        self._barrier = f"{opts.prefix}_herald/barrier"

    def _make_client(self, timeout: float) -> None:
        """A fresh aiomqtt client (one per connect attempt: a cancelled attempt can leave the
        old one locked) that waits ``timeout`` seconds for the CONNACK and the TCP connect."""
        opts = self._opts
        self._client = aiomqtt.Client(
            opts.host,
            opts.port,
            username=opts.username,
            password=opts.password,
            identifier=self.identifier,
            protocol=aiomqtt.ProtocolVersion.V5,
            clean_start=self._clean_start,
            properties=self._props,
            tls_context=self._tls,
            timeout=timeout,
            logger=_client_log,
        )
        self.paho: paho.Client = self._client._client
        self.paho.connect_timeout = timeout
        self.paho.manual_ack_set(True)  # before CONNECT: resent messages must not be auto-acked
        self.paho.max_inflight_messages_set(1000)
        self.paho.on_publish = self._on_publish
        # aiomqtt registers the socket writer with call_soon_threadsafe; when the socket closes
        # before that runs (a flush() wrote everything, then a quick close), asyncio raises on
        # the dead fd. These hooks do the same, but tolerate a closed socket and unregister the
        # writer on close so a reused fd number never meets a stale registration.
        self.paho.on_socket_register_write = self._register_write
        aiomqtt_close: Any = self.paho.on_socket_close
        # aiomqtt ignores a connection closed before the CONNACK and waits out its timeout
        # (a plain client on a TLS port): this tells the attempt at once
        closed: asyncio.Future[None] = self._loop.create_future()
        self._socket_closed = closed

        def mark_closed() -> None:
            if not closed.done():
                closed.set_result(None)

        def on_socket_close(client: Any, userdata: Any, sock: Any) -> None:
            self._loop.call_soon_threadsafe(self._remove_writer, sock.fileno())
            self._loop.call_soon_threadsafe(mark_closed)
            aiomqtt_close(client, userdata, sock)

        self.paho.on_socket_close = on_socket_close
        on_message = self._on_message
        if on_message is not None:
            self.paho.on_message = lambda _c, _u, m: on_message(m)

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
        """Connect within ``connect_timeout`` (:mod:`herald.transports.connecting`): retry an
        unreachable broker; a CONNACK that refuses for good (bad user name or password, not
        authorized, banned...) or a TLS mismatch raise :class:`PermanentTransportError` at
        once."""
        o = self._opts
        endpoint = Endpoint(
            engine="MQTT",
            url=o.url,
            hosts=[(o.host, o.port)],
            tls=self._tls,
            other_mode="mqtt://" if o.tls else "mqtts://",
            ca_option="ca_file",
        )
        first = True

        async def attempt(seconds: float) -> None:
            nonlocal first
            if not first:
                self._make_client(max(0.05, seconds - 0.05))
            first = False
            self._client.timeout = self.paho.connect_timeout = max(0.05, seconds - 0.05)
            enter = asyncio.ensure_future(self._client.__aenter__())
            try:
                waits: list[asyncio.Future[Any]] = [enter, self._socket_closed]
                await asyncio.wait(waits, return_when="FIRST_COMPLETED")
                if not enter.done():
                    raise ConnectionError("the broker closed the connection before its CONNACK")
                enter.result()
            except aiomqtt.MqttCodeError as e:
                code = e.rc.value if isinstance(e.rc, ReasonCode) else e.rc
                if isinstance(code, int) and code in _REFUSED:
                    raise PermanentTransportError(
                        f"MQTT broker {o.url} refused the connection: {e} ({_REFUSED[code]})"
                    ) from None
                raise
            finally:
                enter.cancel()  # (a no-op once done) this client is not used again
            self._client.timeout = ANSWER_TIMEOUT
            self._open = True

        await connect_within(
            endpoint,
            o.connect_timeout,
            attempt,
            transient=(aiomqtt.MqttError,),
            quiet=["aiomqtt", _client_log.name],
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
                batch.future.set_exception(ConnectionLost())
        self._waiting.clear()
        fut = self._client._disconnected
        if fut.done() and not fut.cancelled():
            fut.exception()  # mark a lost connection's error as seen (asyncio warns otherwise)
        try:
            with anyio.move_on_after(ANSWER_TIMEOUT):
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
                timeout=ANSWER_TIMEOUT,
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
        """Publish at QoS 1 and wait for every PUBACK. ``ConnectionLost`` if the connection drops,
        ``TransportError`` if the broker refuses a message."""
        if not items:
            return
        if not self.alive:
            raise ConnectionLost()
        batch = _Batch(len(items))
        publish = self.paho.publish
        for topic, payload, props, retain in items:
            info = publish(topic, payload, 1, retain, props)
            if info.rc != paho.MQTT_ERR_SUCCESS:
                batch.remaining -= 1  # not sent; the whole batch is retried
                raise ConnectionLost()
            self._waiting[info.mid] = batch
        disconnected = self._client._disconnected
        await asyncio.wait([batch.future, disconnected], return_when=asyncio.FIRST_COMPLETED)
        if not batch.future.done():
            raise ConnectionLost()
        batch.future.result()
        if batch.error is not None:
            raise TransportError(f"MQTT broker {self._opts.url} refused a message: {batch.error}")


async def reconnect(opts: MqttOptions, make: Callable[[], Connection]) -> Connection:
    """Open a fresh connection with backoff for up to ``reconnect_timeout`` seconds."""
    deadline = time.monotonic() + opts.reconnect_timeout
    delay = 0.1
    while True:
        conn = make()
        try:
            await conn.open()
            return conn
        except PermanentTransportError:
            raise
        except TransportError as e:
            if time.monotonic() + delay > deadline:
                raise TransportError(
                    f"MQTT broker {opts.url} unreachable for {opts.reconnect_timeout:g}s: {e}"
                ) from None
        await anyio.sleep(delay)
        delay = min(delay * 2, 2.0)
