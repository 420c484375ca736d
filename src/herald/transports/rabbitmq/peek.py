"""Watching a RabbitMQ topic without joining it (:meth:`RabbitMQTransport.peek`).

A server-named, exclusive, auto-delete queue bound with ``#`` to the topic's exchange gets a
copy of every message published while it exists; RabbitMQ deletes it when the peek ends or its
connection drops, so nothing stays behind and no group's queue is touched. A queue receives only
what is published while it is bound, so a peek cannot show earlier messages (``last``).

One thing a bound queue does change: the topic exchange parks messages in ``<topic>:parked``
only while *no* queue is bound to it (see :mod:`herald.transports.rabbitmq.transport`). A peek on
a topic that no group has joined yet would take new messages away from the first group. So a
peek refuses a topic with parked messages (the sign that no group joined it), and a topic that
does not exist yet; the one case it cannot tell is a topic created with nothing parked and no
group yet (a peek then sees messages published meanwhile, and the first group does not).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing, asynccontextmanager
from typing import Protocol, cast

import aiormq
import anyio
from aiormq.abc import DeliveredMessage
from pamqp.commands import Basic

from herald.message import Message
from herald.transports.base import TransportError
from herald.transports.rabbitmq.connection import GONE, Link
from herald.transports.rabbitmq.wire import decode, exchange_name, parked_name

__all__ = ["Source", "peek"]

_PREFETCH = 256
_PATIENCE = 30.0  # seconds to wait for a lost connection before opening the peek


class Source(Protocol):
    """What a peek needs of the transport."""

    @property
    def url(self) -> str: ...

    def _link_or_fail(self) -> Link: ...


@asynccontextmanager
async def peek(source: Source, topic: str) -> AsyncIterator[AsyncIterator[Message]]:
    """Every message published to ``topic`` after entering, until the channel closes."""
    link = source._link_or_fail()
    ch = await link.channel(_PATIENCE)
    try:
        exchange = exchange_name(topic)
        try:
            await ch.exchange_declare(exchange, exchange_type="topic", passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            raise TransportError(
                f"RabbitMQ at {source.url}: no topic {topic!r} (no exchange of that name: "
                "nothing has been published to it yet); peeking creates nothing"
            ) from None
        await _refuse_parked(link, source.url, topic)
        queue = (await ch.queue_declare("", exclusive=True, auto_delete=True)).queue
        assert queue is not None
        await ch.queue_bind(queue, exchange, routing_key="#")
        inbox: asyncio.Queue[DeliveredMessage] = asyncio.Queue()
        await ch.basic_qos(prefetch_count=_PREFETCH)
        await ch.basic_consume(queue, inbox.put, no_ack=False)
        async with aclosing(_follow(source.url, ch, inbox, topic)) as messages:
            yield messages
    except GONE as e:
        raise TransportError(
            f"RabbitMQ at {source.url}: the peek at {topic!r} failed: {link.scrub(e)}"
        ) from None
    finally:
        with anyio.CancelScope(shield=True), contextlib.suppress(*GONE, OSError):
            await ch.close()  # the exclusive queue goes with it


async def _follow(
    url: str,
    ch: aiormq.abc.AbstractChannel,
    inbox: asyncio.Queue[DeliveredMessage],
    topic: str,
) -> AsyncGenerator[Message, None]:
    while True:
        msg: DeliveredMessage | None = None
        with anyio.move_on_after(1.0):
            msg = await inbox.get()
        if msg is None:
            if ch.is_closed:
                raise TransportError(f"RabbitMQ at {url}: the peek at {topic!r} lost its channel")
            continue
        frame = cast(Basic.Deliver, msg.delivery)
        message, _ = decode(topic, frame.routing_key or "", msg.header.properties, msg.body, False)
        yield message
        await ch.basic_ack(frame.delivery_tag or 0)


async def _refuse_parked(link: Link, url: str, topic: str) -> None:
    """Raise if ``topic`` holds parked messages: no group joined it, and a bound peek queue
    would stop the exchange from parking what is published next."""
    ch = await link.channel(_PATIENCE)
    try:
        declared = await ch.queue_declare(parked_name(topic), passive=True)
    except aiormq.exceptions.ChannelNotFoundEntity:
        return  # an exchange made by another client, without Herald's parking
    finally:
        with contextlib.suppress(*GONE, OSError):
            await ch.close()
    parked = declared.message_count or 0
    if parked:
        raise TransportError(
            f"RabbitMQ at {url}: topic {topic!r} has {parked} message(s) parked for its first "
            "group (no group has joined it yet). A peek's queue would take what is published "
            "next away from that group; start a group first"
        )
