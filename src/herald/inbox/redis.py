"""The Redis inbox: one key per handled message, expiring after the retention.

Needs ``redis`` (redis-py, ``pip install 'herald[redis]'``).

Layout
    ``<prefix>:<group>:<key>`` -> the Unix time it was recorded, set with ``NX`` (the first
    record wins) and ``PX`` = ``retention``. Redis's own expiry is the retention:
    :meth:`~RedisInbox.purge` has nothing to do and returns 0. ``%`` and ``:`` in the group are
    percent-escaped, so no two ``(group, key)`` pairs share a Redis key.

Durability
    What Redis promises: with ``appendonly yes`` and ``appendfsync always`` a record survives a
    server crash; with the common ``everysec`` the last second of records may be lost, and
    without persistence a restart forgets them all. A lost record means the message may be
    handled again, never that one is lost.

Transactional mode (weaker than SQL stores)
    Redis cannot commit a handler's arbitrary writes atomically with the record, so
    :meth:`~RedisInbox.transaction` is *record after success*: it yields ``None`` if the key is
    recorded, else yields the :class:`redis.asyncio.Redis` client and records the key only when
    the handler returned without an exception. The handler's writes are not rolled back if it
    raises, and two workers handling the same redelivered key at the same moment may both run
    it. Use an SQL store for exactly-once effects; with Redis make the handler's writes
    idempotent.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from urllib.parse import unquote, urlsplit

import anyio
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from herald.inbox.base import DEFAULT_RETENTION, InboxStore
from herald.transports import redact_url
from herald.transports.base import TransportError

__all__ = ["RedisInbox"]


class RedisInbox(InboxStore):
    """An :class:`~herald.inbox.InboxStore` in Redis keys with expiry.

    :param url: ``redis://[:password@]host[:port][/db]`` (or ``rediss://``, ``unix://``).
    :param prefix: the start of every key this store writes.
    :param retention: seconds a record lives (rounded to milliseconds, at least 1 ms).
    :param connect_timeout: seconds to wait for the server when connecting.

    :meth:`open` may be called by several users (one per consumer group sharing the store);
    the client is closed when the last of them calls :meth:`close`.
    """

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "herald:inbox",
        retention: float = DEFAULT_RETENTION,
        connect_timeout: float = 10.0,
    ) -> None:
        if not prefix:
            raise ValueError("prefix must not be empty")
        if retention <= 0:
            raise ValueError("retention must be positive")
        self.url = url
        self.prefix = prefix
        self.retention = retention
        self.connect_timeout = connect_timeout
        self._ttl_ms = max(1, round(retention * 1000))
        self._client: aioredis.Redis | None = None

    def __repr__(self) -> str:
        return f"RedisInbox({redact_url(self.url)!r}, prefix={self.prefix!r})"

    # --- lifecycle -------------------------------------------------------------------------

    async def _acquire(self) -> None:
        """Connect and check the server answers. Raise :class:`~herald.TransportError`
        (password redacted) if the URL is bad or the server is unreachable or refuses."""
        try:
            client = aioredis.Redis.from_url(
                self.url,
                socket_connect_timeout=self.connect_timeout,
                health_check_interval=30,
            )
        except (ValueError, RedisError) as exc:
            raise self._error(exc, "connect") from exc
        try:
            await client.ping()
        except RedisError as exc:
            with anyio.CancelScope(shield=True):
                await client.aclose()
            raise self._error(exc, "connect") from exc
        self._client = client

    async def _release(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    # --- the contract ----------------------------------------------------------------------

    def key(self, group: str, key: str) -> str:
        """The Redis key of ``(group, key)``."""
        return f"{self.prefix}:{group.replace('%', '%25').replace(':', '%3A')}:{key}"

    async def seen(self, group: str, key: str) -> bool:
        """Whether ``key`` is recorded for ``group`` (and not expired): one ``EXISTS``."""
        client = self._open_client()
        try:
            return bool(await client.exists(self.key(group, key)))
        except RedisError as exc:
            raise self._error(exc, "lookup") from exc

    async def record(self, group: str, keys: Sequence[str]) -> None:
        """Record ``keys`` with one pipelined round trip of ``SET NX PX``."""
        if not keys:
            return
        client = self._open_client()
        at = repr(time.time())
        try:
            async with client.pipeline(transaction=False) as pipe:
                for k in keys:
                    pipe.set(self.key(group, k), at, nx=True, px=self._ttl_ms)
                await pipe.execute()
        except RedisError as exc:
            raise self._error(exc, "record") from exc

    @asynccontextmanager
    async def transaction(self, group: str, key: str) -> AsyncIterator[aioredis.Redis | None]:
        """Record after success (see the module docs: *not* atomic with the handler's writes).

        Yields ``None`` if ``key`` is recorded, else the client; on a clean exit the key is
        recorded, on an exception it is not (and the handler's writes stay as they are).
        """
        client = self._open_client()
        if await self.seen(group, key):
            yield None
            return
        yield client
        with anyio.CancelScope(shield=True):
            await self.record(group, [key])

    async def purge(self) -> int:
        """Nothing to do: Redis expires records by itself. Returns 0."""
        return 0

    # --- plumbing --------------------------------------------------------------------------

    def _open_client(self) -> aioredis.Redis:
        client = self._client
        if client is None:
            raise TransportError(f"redis inbox {redact_url(self.url)!r} is not open")
        return client

    def _error(self, exc: Exception, action: str) -> TransportError:
        text = str(exc)
        password = _password(self.url)
        if password:
            text = text.replace(password, "***")
        return TransportError(f"redis inbox {action} failed on {redact_url(self.url)!r}: {text}")


def _password(url: str) -> str | None:
    try:
        pw = urlsplit(url).password
    except ValueError:
        return None
    return unquote(pw) if pw else None
