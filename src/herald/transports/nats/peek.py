"""Watching a NATS topic without joining it (:meth:`NatsTransport.peek`).

An *ephemeral* pull consumer on the topic's stream with ``AckPolicy.NONE``, in memory, starting
at the ``last`` newest stream sequence (``DeliverPolicy.BY_START_SEQUENCE``) or at new messages
(``DeliverPolicy.NEW``). It is a consumer of its own: the groups' durable consumers, their
positions and pending acks do not change. It is deleted when the peek ends; if the process dies,
the server removes it after ``_INACTIVE`` seconds without a pull request.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import aclosing, asynccontextmanager
from typing import Protocol, TypeVar

import anyio
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.client import JetStreamContext
from nats.js.manager import JetStreamManager

from herald.message import Message
from herald.transports.base import TransportError
from herald.transports.nats.wire import decode_message, stream_name, subject_for

__all__ = ["Source", "peek"]

T = TypeVar("T")

_BATCH = 256
_PULL = 1.0  # seconds one pull request waits
_INACTIVE = 30.0  # seconds: the server deletes an abandoned peek consumer after this long


class Source(Protocol):
    """What a peek needs of the transport."""

    _jsm: JetStreamManager | None

    @property
    def url(self) -> str: ...

    def _require(self) -> Client: ...

    async def _api(self, what: str, call: Callable[[], Awaitable[T]]) -> T: ...


@asynccontextmanager
async def peek(source: Source, topic: str, last: int) -> AsyncIterator[AsyncIterator[Message]]:
    """The ``last`` newest messages of ``topic``'s stream, then each new one. A topic without a
    stream yet is an error (nothing is created)."""
    nc = source._require()
    jsm = source._jsm
    assert jsm is not None
    stream = stream_name(topic)
    try:
        info = await source._api(f"look up stream {stream!r}", lambda: jsm.stream_info(stream))
    except nats.js.errors.NotFoundError:
        raise TransportError(
            f"NATS {source.url}: no stream for topic {topic!r} (nothing has been published to "
            "it yet); peeking creates nothing"
        ) from None
    state = info.state
    config = ConsumerConfig(
        ack_policy=AckPolicy.NONE, inactive_threshold=_INACTIVE, mem_storage=True
    )
    if last and state.messages:
        config.deliver_policy = DeliverPolicy.BY_START_SEQUENCE
        config.opt_start_seq = max(state.first_seq, state.last_seq - last + 1)
    else:
        config.deliver_policy = DeliverPolicy.NEW
    js = nc.jetstream()
    try:
        pull = await source._api(
            f"create a peek consumer on {stream!r}",
            lambda: js.pull_subscribe(subject_for(topic), stream=stream, config=config),
        )
    except nats.js.errors.APIError as e:
        raise TransportError(f"NATS {source.url}: cannot peek at {topic!r}: {e}") from None
    async with aclosing(_follow(pull, topic)) as messages:
        yield messages
        with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
            await pull.unsubscribe()
            if config.name:
                await jsm.delete_consumer(stream, config.name)


async def _follow(
    pull: JetStreamContext.PullSubscription, topic: str
) -> AsyncGenerator[Message, None]:
    while True:
        try:
            batch = await pull.fetch(_BATCH, timeout=_PULL)
        except nats.errors.TimeoutError:
            continue
        for msg in batch:
            headers = dict(msg.headers) if msg.headers else None
            yield decode_message(topic, msg.data, headers, msg.metadata.sequence.stream)
