"""Redis Streams: a topic is a stream, a group is a consumer group.

Needs ``redis`` (redis-py, ``pip install 'herald[redis]'``; with ``hiredis`` installed redis-py
parses replies in C, several times faster) and Redis 6.2 or later. Runs on asyncio.

URL
    ``redis://[[user]:password@]host[:port][/db][?option=value&...]``, or ``rediss://`` for TLS.
    User and password are percent-decoded; the password never appears in logs or errors
    (:attr:`RedisTransport.url` shows ``***``).

Query options
    ``visibility_timeout`` (seconds, default 30)
        A delivery not acked this long after it was handed out (its consumer crashed or hangs)
        is claimed by another member of the group (XAUTOCLAIM with this min-idle-time), with the
        next attempt number.
    ``claim_interval`` (seconds, default 0.5)
        How often a consumer looks for claimable deliveries and due delayed redeliveries that
        another process made (its own process's nacks and closes wake it at once). A crashed
        consumer's deliveries come back within ``visibility_timeout + claim_interval``.
    ``retention`` (``keep``, the default, or ``acked``)
        ``keep``: Herald never deletes an entry from a topic's stream, so a group created later
        with ``start="earliest"`` gets the whole history and ``XRANGE`` shows every message.
        The stream grows until something trims it: set ``maxlen``/``max_age`` or ``acked``,
        or trim it yourself. Chosen as the default because Redis offers streams as logs, and
        silently deleting what a future group or a person with ``redis-cli`` expects to find is
        a worse surprise than memory that grows visibly.
        ``acked``: about once a second each consumer trims its topic below the oldest entry some
        group has not acked (``XTRIM MINID ~``: the smallest of each group's last-delivered id
        and oldest pending id). Never removes what an existing group still needs; a group
        created later starts at what is left. A topic with no group is never trimmed.
    ``maxlen`` (entries) / ``max_age`` (seconds)
        Cap the stream on every publish (``XADD MAXLEN ~ n`` / ``XADD MINID ~ now - age``).
        **These trim regardless of the groups**: entries a group has not read or acked yet are
        removed if the cap says so (a pending one is then dropped from its PEL when claimed).
        Only one of the two; combinable with ``retention=acked``.
    ``reconnect_timeout`` (seconds, default 30)
        How long an operation keeps retrying while Redis cannot be reached (restart, failover)
        before it raises :class:`~herald.transports.base.TransportError`.
    ``connect_timeout`` (seconds, default 10)
        The budget of :meth:`RedisTransport.connect`, the same on every transport
        (:mod:`herald.transports.connecting`): an unreachable server is retried with backoff
        within it, then one :class:`~herald.transports.base.TransportError` names the URL,
        the budget and the cause. Refused credentials (WRONGPASS, NOAUTH), a user without
        permission (NOPERM: Herald needs INFO at connect and the stream and scripting
        commands after) and a TLS mismatch raise
        :class:`~herald.transports.base.PermanentTransportError` at once, as does NOPERM on
        any later command. Also the TCP connect timeout of later reconnects.
    ``socket_timeout`` (seconds, default 10)
    ``ssl_ca_certs``, ``ssl_certfile``, ``ssl_keyfile`` (paths), ``ssl_cert_reqs`` (``required``
    default, ``optional``, ``none``), ``ssl_check_hostname`` (``true`` default / ``false``):
    TLS settings, ``rediss://`` only.

Keys (the wire format)
    ``<topic>``: the stream, named exactly like the topic. An entry's fields:

    ============  =============================================================================
    ``id``        the message id (UUIDv7 text)
    ``payload``   the payload bytes, unchanged
    ``key``       the ordering key; absent when there is none
    ``type``      the event type name; absent when there is none
    ``headers``   the headers as one JSON object of strings; absent when there are none
    ============  =============================================================================

    Headers are one JSON field rather than one field per header: an entry costs one more
    field/value pair instead of one per header (parsing every element costs the consumer more
    than the few bytes do), a header name can be any text without clashing with ``id`` or
    ``payload``, and a reader gets all headers with one JSON parse.

    Entries written by other clients are read liberally: a field not listed above becomes a
    header (``XADD orders * payload '{"a":1}' source billing`` arrives with header
    ``source``); an entry without ``payload`` gets as payload a JSON object of its other fields
    (``XADD orders * order_id 7`` arrives as ``{"order_id":"7"}``); an entry without ``id`` gets
    its stream entry id (``1732500000000-0``), stable across redeliveries.

    ``herald:{<topic>}:groups``: a set of the groups Herald joined on the topic.
    ``herald:{<topic>}:delayed:<group>``: a sorted set of delayed redeliveries: score = due
    time (server clock, Unix ms), member = the fields to deliver, length-prefixed
    (``lua.record``).
    ``herald:{<topic>}:retry:<group>``: a stream, read by the group along with the topic, that
    delayed redeliveries move to when due. Its entries carry the topic entry's fields plus
    ``herald:attempt``; an ack deletes the entry.

Semantics
    * publish: one ``EVALSHA`` per call (one round trip) runs an XADD per message in one
      script, so a batch is stored all or nothing (batches over 4 MiB or 5,000 messages are
      split into several scripts). If the connection drops before the reply, the call is
      retried: the batch may then be stored twice, with the same message ids.
    * subscribe: ``XGROUP CREATE <topic> <group> <0|$> MKSTREAM``: a new group starts at the
      oldest retained entry (``start="earliest"``, id ``0``) or after the newest (``"latest"``,
      ``$``); an existing group keeps its position. Each subscription is a consumer named
      ``<host>-<pid>-<random>``.
    * fetch: ``XREADGROUP ... COUNT max BLOCK ... STREAMS <topic> <retry> > >``. Without
      ``hiredis``, batches are read by a script that packs them into one msgpack reply (the
      pure-Python parser pays per RESP element, a dozen per entry) and the blocking read only
      wakes the consumer. Every
      ``claim_interval`` the maintenance script also claims deliveries idle past the visibility
      timeout, moves due delayed redeliveries into the retry stream, trims (``acked``) and
      removes consumers that own nothing and were idle for 10 minutes.
    * attempt: 1 for a new entry; for a claimed one its delivery count from the PEL (every
      claim adds one); a delayed redelivery carries ``herald:attempt`` and counts on from it.
    * ack: ``XACK`` (and ``XDEL`` for retry-stream entries), one round trip for the batch.
    * nack(0): the entry stays in the PEL but goes to the consumer ``herald:released`` with an
      idle time far past any visibility timeout, so the next claim takes it (attempt + 1).
    * nack(delay): one script acks the entry and parks a copy in the delayed set; it is
      redelivered from the retry stream when due, even if every consumer restarted meanwhile.
    * close: every entry still pending for the subscription is released as by ``nack(0)``, and
      the consumer is deleted.
    * If the group vanishes (server restarted without persistence, topic deleted), a consumer
      waits, creating nothing, until the stream exists again, then joins it again at id ``0``
      (logging a warning), so a deleted topic stays deleted.

Guarantees and limits
    ``features.persistent`` is True: every piece of state (entries, PELs, delayed redeliveries,
    positions) is in Redis, none in a client, so consumers may crash and restart freely. That
    a message survives a restart of *Redis* is the server's configuration: with
    ``appendonly yes`` and ``appendfsync always`` an acknowledged publish survives, with
    ``everysec`` up to a second may be lost, and without persistence (``save ""``,
    ``appendonly no``) a restart loses everything; :meth:`RedisTransport.connect` logs a
    warning when the server reports no persistence. Also: replicas receive writes
    asynchronously (a failover may lose the last writes); a script blocks Redis while it runs
    (publishes are chunked for that reason); the Redis default for the largest value, and so
    the payload, is 512 MiB (``proto-max-bulk-len``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, ClassVar, TypeVar

import anyio
import redis.asyncio as aioredis
from redis.exceptions import (
    AuthenticationError,
    NoPermissionError,
    NoScriptError,
    RedisError,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from herald.message import Message
from herald.transports import redact_url
from herald.transports.base import (
    Features,
    GroupInfo,
    Start,
    TopicInfo,
    Transport,
    TransportError,
    check_peek,
    check_topology,
    unsupported,
    validate_name,
)
from herald.transports.redis import listing, lua, peek
from herald.transports.redis.connection import open_client, refused
from herald.transports.redis.options import RedisOptions, parse_url
from herald.transports.redis.subscription import RedisSubscription
from herald.transports.redis.wire import (
    as_str,
    delayed_key,
    entry_fields,
    execute,
    groups_key,
    retry_key,
)

__all__ = ["RedisSubscription", "RedisTransport"]

log = logging.getLogger("herald.transports.redis")

T = TypeVar("T")

#: A publish is split into scripts of at most this many messages / bytes.
_CHUNK_MESSAGES = 5000
_CHUNK_BYTES = 4 * 1024 * 1024


class RedisTransport(Transport):
    """Redis Streams with consumer groups. See the module documentation for the details."""

    schemes: ClassVar[tuple[str, ...]] = ("redis", "rediss")
    features = Features(
        persistent=True,  # all state is in Redis; surviving a Redis restart is its config
        cross_process=True,
        ordered_per_key=True,  # one stream, read in order by one consumer
        native_delay=True,  # the delayed set lives in Redis
        replay=True,
        headers=True,
        max_payload=512 * 1024 * 1024,  # Redis's default proto-max-bulk-len
        listing=True,
    )

    def __init__(self, options: RedisOptions, url: str) -> None:
        self._options = options
        self._url = redact_url(url)
        self._client: aioredis.Redis | None = None
        self._shas: dict[str, str] = {}
        self._subscriptions: set[RedisSubscription] = set()
        #: (topic, group) -> counter bumped when this process released deliveries or parked a
        #: delayed one, so local members of the group look (claim) again at once.
        self._kicks: dict[tuple[str, str], int] = {}
        self._closed = False
        #: bumped by close(): a connect() that was under way meanwhile drops its client
        self._generation = 0

    @classmethod
    def from_url(cls, url: str) -> RedisTransport:
        return cls(parse_url(url), url)

    def __repr__(self) -> str:
        return f"RedisTransport({self._url!r})"

    @property
    def url(self) -> str:
        return self._url

    # --- lifecycle -------------------------------------------------------------------------

    async def connect(self) -> None:
        """Connect and check the server within ``connect_timeout``
        (:mod:`herald.transports.redis.connection`). After :meth:`close` it connects again."""
        if self._client is not None:
            return
        self._closed = False
        generation = self._generation
        client = await open_client(self._options, self._url, self._clean_text)
        if self._client is not None or self._generation != generation:
            await client.aclose()  # a concurrent connect() won, or close() ran meanwhile
            return
        self._client = client

    async def close(self) -> None:
        """Close every subscription (releasing unacked deliveries) and the connections."""
        if self._closed:
            return
        self._closed = True
        self._generation += 1
        with anyio.CancelScope(shield=True):
            for sub in list(self._subscriptions):
                try:
                    await sub.close()
                except TransportError as e:
                    log.warning("closing %s/%s: %s", sub.topic, sub.group, e)
            client, self._client = self._client, None
            if client is not None:
                await client.aclose()

    def _clean(self, e: BaseException) -> str:
        return self._clean_text(str(e) or type(e).__name__)

    def _clean_text(self, text: str) -> str:
        password = self._options.password
        if password:
            text = text.replace(password, "***")
        return text

    def _require(self) -> aioredis.Redis:
        if self._client is None:
            if self._closed:
                raise TransportError(f"redis transport for {self._url} is closed")
            raise TransportError(f"redis transport for {self._url} is not connected")
        return self._client

    async def _call(self, what: str, op: Callable[[aioredis.Redis], Awaitable[T]]) -> T:
        """Run ``op``, retrying while Redis cannot be reached for up to ``reconnect_timeout``;
        turn every failure into :class:`TransportError`."""
        failing_since: float | None = None
        backoff = 0.05
        while True:
            client = self._require()
            try:
                return await op(client)
            except (AuthenticationError, NoPermissionError) as e:
                permanent = refused(self._url, e, what, self._clean_text)
                assert permanent is not None
                raise permanent from None
            except (RedisConnectionError, RedisTimeoutError, OSError) as e:
                now = time.monotonic()
                if failing_since is None:
                    failing_since = now
                    log.warning(
                        "redis at %s: %s failed (%s); retrying", self._url, what, self._clean(e)
                    )
                if now - failing_since >= self._options.reconnect_timeout:
                    raise TransportError(
                        f"redis at {self._url} unreachable for "
                        f"{self._options.reconnect_timeout:g}s during {what}: {self._clean(e)}"
                    ) from None
                await anyio.sleep(backoff)
                backoff = min(backoff * 2, 1.0)
            except ResponseError:
                raise  # callers handle NOGROUP etc.
            except RedisError as e:
                raise TransportError(
                    f"redis at {self._url}: {what} failed: {self._clean(e)}"
                ) from None

    async def _script(
        self, client: aioredis.Redis, body: str, keys: Sequence[Any], args: Sequence[Any]
    ) -> Any:
        """EVALSHA, loading the script on first use (and again after a server restart)."""
        sha = self._shas.get(body)
        if sha is not None:
            try:
                return await execute(client, "EVALSHA", sha, len(keys), *keys, *args)
            except NoScriptError:
                pass
        loaded = await client.script_load(body)
        sha = loaded.decode() if isinstance(loaded, bytes) else str(loaded)
        self._shas[body] = sha
        return await execute(client, "EVALSHA", sha, len(keys), *keys, *args)

    def _kick(self, topic: str, group: str) -> None:
        k = (topic, group)
        self._kicks[k] = self._kicks.get(k, 0) + 1

    # --- publish ---------------------------------------------------------------------------

    async def publish(self, topic: str, messages: Sequence[Message]) -> None:
        """XADD every message (one script per chunk, one round trip for a normal batch)."""
        validate_name("topic", topic)
        if not messages:
            return
        o = self._options
        if o.maxlen is not None:
            trim: tuple[str, int] = ("MAXLEN", o.maxlen)
        elif o.max_age is not None:
            trim = ("MINID", max(1, round(o.max_age * 1000)))
        else:
            trim = ("", 0)
        chunks: list[list[bytes]] = [[]]
        size = 0
        record = lua.record
        for m in messages:
            r = record(entry_fields(m))
            if chunks[-1] and (len(chunks[-1]) >= _CHUNK_MESSAGES or size + len(r) > _CHUNK_BYTES):
                chunks.append([])
                size = 0
            chunks[-1].append(r)
            size += len(r)
        blobs = [lua.batch(c) for c in chunks]

        async def op(client: aioredis.Redis) -> None:
            for blob in blobs:
                await self._script(client, lua.PUBLISH, [topic], [blob, *trim])

        try:
            await self._call(f"publish to {topic!r}", op)
        except ResponseError as e:
            raise TransportError(
                f"redis at {self._url} refused publishing to {topic!r}: {self._clean(e)}"
            ) from None

    # --- subscribe -------------------------------------------------------------------------

    async def subscribe(
        self,
        topic: str,
        group: str,
        *,
        start: Start = "earliest",
        bind: Sequence[str] = (),
        source: str | None = None,
    ) -> RedisSubscription:
        """Join ``group`` on ``topic`` (see the module docstring). ``bind`` and ``source``
        raise ``ValueError``: a stream has no routing keys, and the topic *is* the stream key,
        so a plain ``XADD <topic> * ...`` is consumed as it is."""
        validate_name("topic", topic)
        validate_name("group", group)
        bind, source = check_topology(bind, source)
        if bind:
            raise unsupported(
                "redis",
                "bind",
                "a stream has no routing keys (every group gets every entry); use filter=",
            )
        if source is not None:
            raise unsupported(
                "redis",
                "source",
                "the topic is the stream key, so name the stream as the topic; a key that is "
                "not a valid topic name (e.g. with ':') cannot be consumed, because what Herald "
                "publishes to the topic (dead-letter replays) would go to another stream than "
                "the group reads",
            )
        if start not in ("earliest", "latest"):
            raise ValueError(f"start must be 'earliest' or 'latest', not {start!r}")
        self._require()
        sub = RedisSubscription(self, topic, group)
        await sub._create_groups("0" if start == "earliest" else "$")
        self._subscriptions.add(sub)
        return sub

    # --- read-only tooling -----------------------------------------------------------------

    def peek(
        self, topic: str, *, last: int = 0
    ) -> AbstractAsyncContextManager[AsyncIterator[Message]]:
        """``XREVRANGE``, then ``XREAD BLOCK`` without a group (see
        :mod:`herald.transports.redis.peek`)."""
        check_peek(self, topic, last)
        self._require()
        return peek.peek(self, topic, last)

    async def list_topics(self) -> list[TopicInfo]:
        return await self._call("list topics", listing.topics)

    async def list_groups(self, topic: str) -> list[GroupInfo]:
        validate_name("topic", topic)
        try:
            return await self._call("list groups", lambda c: listing.groups(c, topic))
        except ResponseError as e:  # WRONGTYPE: not a stream
            raise TransportError(f"redis at {self._url}: {topic!r}: {self._clean(e)}") from None

    async def delete_topic(self, topic: str) -> None:
        """Delete the topic's stream, its groups' delayed sets and retry streams, and the
        dead-letter and skipped topics (``<topic>.<group>.dlq`` / ``.skipped``) of its groups.
        A missing topic is not an error; a key of that name that is not a stream is refused."""
        validate_name("topic", topic)
        await self._delete(topic, depth=0)

    async def _delete(self, topic: str, depth: int) -> None:
        registry = groups_key(topic)

        async def op(client: aioredis.Redis) -> list[str]:
            kind = await client.type(topic)
            kind = kind.decode() if isinstance(kind, bytes) else str(kind)
            if kind not in ("stream", "none"):
                raise TransportError(
                    f"redis at {self._url}: key {topic!r} is a {kind}, not a Herald topic"
                )
            groups = {as_str(g) for g in await client.smembers(registry)}
            if kind == "stream":
                for info in await client.xinfo_groups(topic):
                    entry: dict[Any, Any] = dict(info)
                    groups.add(as_str(entry.get("name", entry.get(b"name", b""))))
            keys = [topic, registry]
            for g in sorted(groups):
                keys += [retry_key(topic, g), delayed_key(topic, g)]
            await client.unlink(*keys)
            return sorted(groups) if kind == "stream" or groups else []

        groups = await self._call(f"delete topic {topic!r}", op)
        if depth >= 2:
            return
        for g in groups:
            for suffix in ("dlq", "skipped"):
                name = f"{topic}.{g}.{suffix}"
                try:
                    validate_name("topic", name)
                except ValueError:
                    continue
                await self._delete(name, depth + 1)
