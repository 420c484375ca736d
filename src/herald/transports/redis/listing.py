"""What a Redis server holds: Herald topics and their groups (:meth:`RedisTransport.list_topics`).

A topic is a stream named like it; the transport's own keys all start with ``herald:`` and
are left out (see :mod:`herald.transports.redis.transport`). Reads only: ``SCAN TYPE stream``,
``XLEN``, ``XINFO GROUPS``.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from herald.transports.base import GroupInfo, TopicInfo
from herald.transports.redis.wire import as_str

__all__ = ["groups", "topics"]

_SCAN_COUNT = 1000


async def topics(client: aioredis.Redis) -> list[TopicInfo]:
    """Every stream that is not one of the transport's helper keys, with its length."""
    names = sorted(
        {
            as_str(key)
            async for key in client.scan_iter(count=_SCAN_COUNT, _type="stream")
            if not as_str(key).startswith("herald:")
        }
    )
    async with client.pipeline(transaction=False) as pipe:
        for name in names:
            pipe.xlen(name)
        lengths = await pipe.execute()
    return [TopicInfo(n, messages=int(length)) for n, length in zip(names, lengths, strict=True)]


async def groups(client: aioredis.Redis, topic: str) -> list[GroupInfo]:
    """``XINFO GROUPS``: ``lag`` (entries not delivered to the group yet; unknown after some
    deletions), ``pending`` (its pending entries list), ``consumers``."""
    try:
        infos: list[Any] = await client.xinfo_groups(topic)
    except ResponseError as e:
        if "no such key" in str(e).lower():
            return []
        raise
    out = []
    for info in infos:
        entry = {as_str(k): v for k, v in dict(info).items()}
        lag = entry.get("lag")
        out.append(
            GroupInfo(
                as_str(entry["name"]),
                lag=int(lag) if lag is not None else None,
                pending=int(entry.get("pending", 0)),
                consumers=int(entry.get("consumers", 0)),
            )
        )
    return sorted(out, key=lambda g: g.name)
