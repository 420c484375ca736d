"""One member of a group on Redis Streams: fetch and claims, ack/nack, delayed redelivery, close.

Part of :mod:`herald.transports.redis.transport` (whose docstring describes the keys and semantics);
split out to keep one concept per file. The transport creates :class:`RedisSubscription` objects.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Any, Protocol, TypeVar

import anyio
import msgspec
import redis.asyncio as aioredis
import redis.utils
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from herald.transports.base import Delivery, Subscription, TransportError
from herald.transports.redis import lua
from herald.transports.redis.options import RedisOptions, consumer_name
from herald.transports.redis.wire import (
    ATTEMPT_FIELD,
    delayed_key,
    entry_fields,
    entry_message,
    execute,
    groups_key,
    is_nogroup,
    retry_key,
)

__all__ = ["PARKING", "Owner", "RedisSubscription"]

log = logging.getLogger("herald.transports.redis")

#: The consumer that released deliveries (nack(0), close) wait under until someone claims them.
PARKING = "herald:released"
#: Consumers owning nothing and idle this long are removed from their group (ms).
_REAP_IDLE_MS = 600_000
_REAP_EVERY = 60.0
_TRIM_EVERY = 1.0

#: Read batches through the READ script (one packed reply) instead of plain XREADGROUP when
#: redis-py parses replies in pure Python: see lua.READ.
_LUA_READ = not redis.utils.HIREDIS_AVAILABLE
_decode_packed = msgspec.msgpack.Decoder(list[tuple[int, bytes, list[bytes]]]).decode


class _RetryId(bytes):
    """The token of a delivery from a group's retry stream (a plain ``bytes`` token is an
    entry of the topic's stream)."""

    __slots__ = ()


async def _read(args: tuple[Any, ...], client: Any) -> Any:
    return await client.execute_command(*args)


async def _exists(key: str, client: Any) -> bool:
    return bool(await client.exists(key))


T = TypeVar("T")


class Owner(Protocol):
    """What a subscription uses of the transport that made it. The transport module imports
    this one, so this one names these members instead of importing the transport class."""

    @property
    def url(self) -> str: ...

    @property
    def _options(self) -> RedisOptions: ...

    @property
    def _client(self) -> aioredis.Redis | None:
        """None once the transport is closed."""
        ...

    @property
    def _subscriptions(self) -> set[RedisSubscription]:
        """The transport's open subscriptions; a closing one removes itself."""
        ...

    @property
    def _kicks(self) -> dict[tuple[str, str], int]:
        """(topic, group) -> counter bumped by :meth:`_kick`."""
        ...

    def _clean(self, e: BaseException) -> str:
        """The error's text without the password."""
        ...

    async def _call(self, what: str, op: Callable[[aioredis.Redis], Awaitable[T]]) -> T:
        """Run ``op`` on the client, retrying while Redis is unreachable (bounded)."""
        ...

    async def _script(
        self, client: aioredis.Redis, body: str, keys: Sequence[Any], args: Sequence[Any]
    ) -> Any:
        """Run one of :mod:`.lua`'s scripts by hash, loading it once."""
        ...

    def _kick(self, topic: str, group: str) -> None:
        """Make local members of the group look (claim) again at once."""
        ...


class RedisSubscription(Subscription):
    """One consumer of ``group`` on ``topic``."""

    def __init__(self, transport: Owner, topic: str, group: str) -> None:
        self.topic = topic
        self.group = group
        self.consumer = consumer_name()
        self._t = transport
        self._topic_b = topic.encode()
        self._retry = retry_key(topic, group)
        self._delayed = delayed_key(topic, group)
        o = transport._options
        self._min_idle = max(1, round(o.visibility_timeout * 1000))
        self._claim_interval = o.claim_interval
        self._block_cap = min(o.claim_interval, o.socket_timeout / 2)
        #: monotonic times of the next maintenance steps
        self._maintain_at = 0.0
        self._trim_at = 0.0 if o.retention == "acked" else math.inf
        self._reap_at = time.monotonic() + _REAP_EVERY * secrets.randbelow(1000) / 1000
        self._next_due = math.inf  # monotonic time the next delayed redelivery is due
        self._cursors = [b"0-0", b"0-0"]
        self._kick_seen = -1
        self._buffer: list[Delivery] = []
        self._fetch_scope: anyio.CancelScope | None = None
        self._closed = False
        self._gone = False  # the topic's stream was found missing (logged once)
        self._read_args = (
            "XREADGROUP", "GROUP", group, self.consumer, "COUNT",
        )  # fmt: skip

    def __repr__(self) -> str:
        return (
            f"RedisSubscription(topic={self.topic!r}, group={self.group!r}, "
            f"consumer={self.consumer!r})"
        )

    def _check_open(self) -> None:
        if self._closed:
            raise TransportError(
                f"subscription {self.group!r} on {self.topic!r} ({self._t.url}) is closed"
            )

    async def _create_groups(self, start_id: str) -> None:
        topic, group = self.topic, self.group

        async def op(client: aioredis.Redis) -> None:
            pipe = client.pipeline(transaction=False)
            pipe.execute_command("XGROUP", "CREATE", topic, group, start_id, "MKSTREAM")
            pipe.execute_command("XGROUP", "CREATE", self._retry, group, "0", "MKSTREAM")
            pipe.sadd(groups_key(topic), group)
            for result in await pipe.execute(raise_on_error=False):
                if isinstance(result, ResponseError) and not str(result).startswith("BUSYGROUP"):
                    raise TransportError(
                        f"redis at {self._t.url} refused joining group {group!r} on "
                        f"{topic!r}: {self._t._clean(result)}"
                    )
                if isinstance(result, (RedisConnectionError, RedisTimeoutError)):
                    raise result
                if isinstance(result, Exception) and not isinstance(result, ResponseError):
                    raise TransportError(f"redis at {self._t.url}: {self._t._clean(result)}")

        await self._t._call(f"join group {group!r} on {topic!r}", op)

    async def _vanished(self, e: ResponseError, deadline: float) -> None:
        """The group is gone (NOGROUP, or UNBLOCKED: the stream was deleted while we waited).
        If the stream exists again (a server restarted without persistence and someone
        published), join it again at the start; if not (the topic was deleted), wait for it
        without creating anything, so a deleted topic stays deleted."""
        if not is_nogroup(e):
            raise self._error("fetch", e) from None
        if await self._t._call("fetch", partial(_exists, self.topic)):
            log.warning(
                "group %r on %r vanished from redis at %s (server restarted without "
                "persistence, or the topic was deleted and published to again); joining it "
                "again at the start of the stream",
                self.group, self.topic, self._t.url,
            )  # fmt: skip
            await self._create_groups("0")
            self._cursors = [b"0-0", b"0-0"]
            self._gone = False
            return
        if not self._gone:
            self._gone = True
            log.warning(
                "topic %r does not exist on redis at %s (deleted, or the server restarted "
                "without persistence); group %r waits for it to be published to",
                self.topic, self._t.url, self.group,
            )  # fmt: skip
        self._maintain_at = time.monotonic() + self._claim_interval
        await anyio.sleep(max(0.0, min(deadline - time.monotonic(), self._claim_interval)))

    # --- fetch -----------------------------------------------------------------------------

    async def fetch(self, max_messages: int, timeout: float) -> list[Delivery]:
        """Up to ``max_messages`` deliveries: claimed and delayed redeliveries, then new
        entries in stream order. Waits up to ``timeout`` seconds for the first."""
        if max_messages < 1:
            raise ValueError(f"max_messages must be >= 1, not {max_messages!r}")
        self._check_open()
        if self._buffer:
            out, self._buffer = self._buffer[:max_messages], self._buffer[max_messages:]
            return out
        deadline = time.monotonic() + max(0.0, timeout)
        with anyio.CancelScope() as scope:
            self._fetch_scope = scope
            try:
                return await self._fetch(max_messages, deadline)
            finally:
                self._fetch_scope = None
        return []  # cancelled by close()

    async def _fetch(self, limit: int, deadline: float) -> list[Delivery]:
        t = self._t
        kicks = t._kicks
        key = (self.topic, self.group)
        read_args = (*self._read_args, limit)
        wake_args = (*self._read_args, 1)
        read_keys = (self.topic, self._retry)
        read_argv = (self.group, self.consumer, limit)
        streams = ("STREAMS", self.topic, self._retry, ">", ">")
        while True:
            if self._closed:
                return []
            now = time.monotonic()
            kick = kicks.get(key, 0)
            if now >= self._maintain_at or now >= self._next_due or kick != self._kick_seen:
                if kick != self._kick_seen:
                    self._kick_seen = kick
                    self._cursors = [b"0-0", b"0-0"]
                try:
                    claimed = await self._maintain(limit)
                except ResponseError as e:
                    await self._vanished(e, deadline)
                    if time.monotonic() >= deadline:
                        return []
                    continue
                if claimed:
                    return claimed
                now = time.monotonic()
            if _LUA_READ:
                try:
                    packed = await t._call(
                        f"fetch from {self.topic!r}",
                        lambda c: t._script(c, lua.READ, read_keys, read_argv),
                    )
                except ResponseError as e:
                    await self._vanished(e, deadline)
                    if time.monotonic() >= deadline:
                        return []
                    continue
                if packed:
                    return self._unpack(packed)
                now = time.monotonic()
            remaining = deadline - now
            wait = min(remaining, self._block_cap, self._maintain_at - now, self._next_due - now)
            block_ms = int(wait * 1000)
            args: tuple[Any, ...]
            if block_ms < 1:
                if _LUA_READ:  # the script read already: maintenance, or the deadline, is next
                    if time.monotonic() >= deadline:
                        return []
                    continue
                args = (*read_args, *streams)
            else:  # with _LUA_READ, a blocking read of 1 wakes us; the script reads the rest
                args = (*(wake_args if _LUA_READ else read_args), "BLOCK", block_ms, *streams)
            try:
                reply = await t._call(f"fetch from {self.topic!r}", partial(_read, args))
            except ResponseError as e:
                await self._vanished(e, deadline)
                if time.monotonic() >= deadline:
                    return []
                continue
            if reply:
                out = self._deliveries(reply)
                if len(out) > limit:
                    self._buffer = out[limit:]
                    out = out[:limit]
                if out:
                    return out
            if time.monotonic() >= deadline:
                return []

    def _error(self, what: str, e: BaseException) -> TransportError:
        return TransportError(
            f"redis at {self._t.url}: {what} on {self.topic!r}/{self.group!r} failed: "
            f"{self._t._clean(e)}"
        )

    def _deliveries(self, reply: list[Any]) -> list[Delivery]:
        topic, topic_b = self.topic, self._topic_b
        out: list[Delivery] = []
        for stream, entries in reply:
            if stream == topic_b:
                for eid, flat in entries:
                    if flat is None:
                        continue
                    message, _ = entry_message(topic, eid, flat)
                    out.append(Delivery(message, 1, eid))
            else:
                for eid, flat in entries:
                    if flat is None:
                        continue
                    message, base = entry_message(topic, eid, flat)
                    out.append(Delivery(message, base or 1, _RetryId(eid)))
        return out

    def _unpack(self, packed: bytes) -> list[Delivery]:
        """Deliveries from a READ script reply."""
        topic = self.topic
        out: list[Delivery] = []
        for which, eid, flat in _decode_packed(packed):
            message, base = entry_message(topic, eid, flat)
            if which:
                out.append(Delivery(message, base or 1, _RetryId(eid)))
            else:
                out.append(Delivery(message, 1, eid))
        return out

    async def _maintain(self, limit: int) -> list[Delivery]:
        t = self._t
        now = time.monotonic()
        trim = now >= self._trim_at
        reap = now >= self._reap_at
        args = [
            self.group,
            self.consumer,
            limit,
            self._min_idle,
            self._cursors[0],
            self._cursors[1],
            "1" if trim else "0",
            _REAP_IDLE_MS if reap else -1,
        ]
        keys = [self.topic, self._retry, self._delayed]
        main, retry, cur_main, cur_retry, wait_ms = await t._call(
            f"claim on {self.topic!r}", lambda c: t._script(c, lua.MAINTAIN, keys, args)
        )
        now = time.monotonic()
        self._cursors = [cur_main, cur_retry]
        self._maintain_at = now + self._claim_interval
        if trim:
            self._trim_at = now + _TRIM_EVERY
        if reap:
            self._reap_at = now + _REAP_EVERY
        self._next_due = now + wait_ms / 1000 if wait_ms >= 0 else math.inf
        if not (main or retry):
            return []
        topic = self.topic
        out = []
        for eid, flat, count in main:
            message, _ = entry_message(topic, eid, flat)
            out.append(Delivery(message, max(1, int(count)), eid))
        for eid, flat, count in retry:
            message, base = entry_message(topic, eid, flat)
            out.append(Delivery(message, max(1, base) + max(0, int(count) - 1), _RetryId(eid)))
        return out

    # --- ack / nack / close ----------------------------------------------------------------

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        """XACK the deliveries (and XDEL those from the retry stream): one round trip."""
        self._check_open()
        if not deliveries:
            return
        main = [d.token for d in deliveries if type(d.token) is bytes]
        retry = [d.token for d in deliveries if type(d.token) is _RetryId]
        topic, group = self.topic, self.group

        async def op(client: aioredis.Redis) -> None:
            if not retry:
                await execute(client, "XACK", topic, group, *main)
                return
            pipe = client.pipeline(transaction=True)
            if main:
                pipe.execute_command("XACK", topic, group, *main)
            pipe.execute_command("XACK", self._retry, group, *retry)
            pipe.execute_command("XDEL", self._retry, *retry)
            await pipe.execute()

        with anyio.CancelScope(shield=True):  # half an ack is no ack
            try:
                await self._t._call(f"ack on {topic!r}", op)
            except ResponseError as e:
                raise self._error("ack", e) from None

    async def nack(self, delivery: Delivery, delay: float = 0.0) -> None:
        """Deliver again with ``attempt + 1``: at once (``delay`` 0), or after ``delay``
        seconds from the group's delayed set in Redis. Others are not held up meanwhile."""
        self._check_open()
        if not (delay >= 0 and math.isfinite(delay)):
            raise ValueError(f"nack delay must be a finite number >= 0, not {delay!r}")
        t = self._t
        token = delivery.token
        from_retry = type(token) is _RetryId
        stream = self._retry if from_retry else self.topic
        delay_ms = round(delay * 1000)
        if delay_ms <= 0:
            keys: list[Any] = [stream]
            args: list[Any] = [self.group, self.consumer, PARKING, bytes(token)]
            body = lua.RELEASE
        else:
            copy = entry_fields(delivery.message)
            copy += (ATTEMPT_FIELD, str(delivery.attempt + 1))
            keys = [stream, self._delayed]
            args = [
                self.group,
                self.consumer,
                bytes(token),
                delay_ms,
                lua.record(copy),
                "1" if from_retry else "0",
            ]
            body = lua.NACK_DELAYED
        with anyio.CancelScope(shield=True):
            try:
                await t._call(f"nack on {self.topic!r}", lambda c: t._script(c, body, keys, args))
            except ResponseError as e:
                if not is_nogroup(e):
                    raise self._error("nack", e) from None
        t._kick(self.topic, self.group)

    async def close(self) -> None:
        """Release every delivery still pending for this consumer (the next claim by any member
        takes them, with the next attempt) and leave the group. Idempotent."""
        if self._closed:
            return
        self._closed = True
        t = self._t
        t._subscriptions.discard(self)
        if self._fetch_scope is not None:
            self._fetch_scope.cancel()  # a waiting fetch returns []
        self._buffer = []
        if t._client is None:
            return
        keys = [self.topic, self._retry]
        args = [self.group, self.consumer, PARKING]
        with anyio.CancelScope(shield=True):
            try:
                released = await t._call(
                    f"leave group {self.group!r} on {self.topic!r}",
                    lambda c: t._script(c, lua.CLOSE, keys, args),
                )
            except ResponseError as e:
                raise self._error("close", e) from None
        if released:
            t._kick(self.topic, self.group)
