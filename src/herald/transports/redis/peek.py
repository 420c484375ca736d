"""Watching a Redis topic without joining it (:meth:`RedisTransport.peek`).

``XREVRANGE`` for the ``last`` newest entries, then ``XREAD BLOCK`` after the newest id seen:
plain reads without a consumer group, so no group's position or pending list changes. Entries
of the groups' retry streams (redeliveries) are not shown; the topic's stream is.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import aclosing, asynccontextmanager
from functools import partial
from typing import Any, Protocol, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from herald.message import Message
from herald.transports.base import TransportError
from herald.transports.redis.wire import entry_message

__all__ = ["Caller", "peek"]

T = TypeVar("T")

_BLOCK_MS = 1000  # one blocking read; well below the client's socket_timeout
_COUNT = 256


class Caller(Protocol):
    """What a peek needs of the transport."""

    _closed: bool

    @property
    def url(self) -> str: ...

    async def _call(self, what: str, op: Callable[[aioredis.Redis], Awaitable[T]]) -> T: ...


@asynccontextmanager
async def peek(redis: Caller, topic: str, last: int) -> AsyncIterator[AsyncIterator[Message]]:
    """The ``last`` newest entries of ``topic``'s stream, then each new one, until the
    transport closes. A topic that does not exist yet is waited for, not created."""
    try:
        newest: Any = await redis._call(
            f"peek at {topic!r}", lambda c: c.xrevrange(topic, "+", "-", count=max(1, last))
        )
    except ResponseError as e:  # WRONGTYPE: the key is not a stream
        raise TransportError(f"redis at {redis.url}: cannot peek at {topic!r}: {e}") from None
    cursor: bytes = newest[0][0] if newest else b"0-0"
    async with aclosing(_follow(redis, topic, cursor, newest[:last][::-1])) as messages:
        yield messages


async def _follow(
    redis: Caller, topic: str, cursor: bytes, first: list[Any]
) -> AsyncGenerator[Message, None]:
    for eid, fields in first:
        yield _message(topic, eid, fields)
    try:
        while not redis._closed:
            reply: Any = await redis._call(
                f"peek at {topic!r}",
                partial(_read, after=cursor, topic=topic),
            )
            for _, entries in reply or ():
                for eid, fields in entries:
                    cursor = eid
                    yield _message(topic, eid, fields)
    except ResponseError as e:  # WRONGTYPE: the key is not a stream
        raise TransportError(f"redis at {redis.url}: cannot peek at {topic!r}: {e}") from None


async def _read(client: aioredis.Redis, *, topic: str, after: bytes) -> Any:
    return await client.xread({topic: after}, count=_COUNT, block=_BLOCK_MS)


def _message(topic: str, eid: bytes, fields: dict[Any, Any]) -> Message:
    flat = [x for pair in fields.items() for x in pair]
    message, _ = entry_message(topic, eid, flat)
    return message
