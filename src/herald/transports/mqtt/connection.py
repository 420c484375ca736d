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

from herald.transports.base import TransportError
from herald.transports.mqtt.options import MqttOptions

__all__ = ["Connection", "ConnectionLost", "Item", "reconnect"]

log = logging.getLogger("herald.transports.mqtt")

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
                batch.future.set_exception(ConnectionLost())
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
        except TransportError as e:
            if time.monotonic() + delay > deadline:
                raise TransportError(
                    f"MQTT broker {opts.url} unreachable for {opts.reconnect_timeout:g}s: {e}"
                ) from None
        await anyio.sleep(delay)
        delay = min(delay * 2, 2.0)
