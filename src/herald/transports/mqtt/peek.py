"""Watching an MQTT topic without joining it (:meth:`MqttTransport.peek`).

A connection of its own with a clean, non-persistent session (clean start, session expiry 0)
and a plain, non-shared QoS 1 subscription to the topic: the broker sends it a copy of each
message published meanwhile, next to what it sends each group's shared subscription, and forgets
the session when the peek disconnects. MQTT cannot replay, so ``last`` is refused; a retained
message on the topic (a plain client's) is shown first, as MQTT sends it to every new
subscriber. Redeliveries (the groups' retry topics) are not shown.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing, asynccontextmanager
from typing import Protocol

import anyio
from paho.mqtt import client as paho

from herald.message import Message
from herald.transports.base import TransportError
from herald.transports.mqtt.connection import Connection
from herald.transports.mqtt.options import MqttOptions
from herald.transports.mqtt.wire import decode_message

__all__ = ["Source", "peek"]


class Source(Protocol):
    """What a peek needs of the transport."""

    @property
    def options(self) -> MqttOptions: ...

    def mqtt_topic(self, topic: str) -> str: ...


@asynccontextmanager
async def peek(source: Source, topic: str) -> AsyncIterator[AsyncIterator[Message]]:
    """Every message published to ``topic`` after entering, until the connection drops."""
    inbox: asyncio.Queue[paho.MQTTMessage] = asyncio.Queue()
    conn = Connection(
        source.options,
        f"herald-peek-{uuid.uuid4().hex[:16]}",
        session_expiry=0,
        clean_start=True,
        on_message=inbox.put_nowait,
    )
    await conn.open()
    try:
        conn.paho.manual_ack_set(False)  # nothing to hold back: paho acks each QoS 1 message
        await conn._client.subscribe(source.mqtt_topic(topic), qos=1)  # returns on SUBACK
        async with aclosing(_follow(source.options.url, conn, inbox, topic)) as messages:
            yield messages
    finally:
        with anyio.CancelScope(shield=True):
            await conn.close()


async def _follow(
    url: str, conn: Connection, inbox: asyncio.Queue[paho.MQTTMessage], topic: str
) -> AsyncGenerator[Message, None]:
    while True:
        msg: paho.MQTTMessage | None = None
        with anyio.move_on_after(1.0):
            msg = await inbox.get()
        if msg is None:
            if not conn.alive:
                raise TransportError(
                    f"MQTT broker {url}: the peek at {topic!r} lost its connection"
                )
            continue
        props = getattr(msg, "properties", None)
        yield decode_message(topic, bytes(msg.payload), props).message
