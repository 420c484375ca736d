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
    ``connect_timeout`` (seconds, default 5), ``socket_timeout`` (seconds, default 10)
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
    (``_redis_lua.record``).
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
import math
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, ClassVar, TypeVar
from urllib.parse import parse_qsl, unquote, urlsplit

import anyio
import msgspec
import redis.asyncio as aioredis
import redis.utils
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from herald.message import Message
from herald.transports import _redis_lua as lua
from herald.transports import redact_url
from herald.transports.base import (
    Delivery,
    Features,
    Start,
    Subscription,
    Transport,
    TransportError,
    validate_name,
)

__all__ = ["RedisSubscription", "RedisTransport"]

log = logging.getLogger("herald.transports.redis")

T = TypeVar("T")

#: The consumer that released deliveries (nack(0), close) wait under until someone claims them.
PARKING = "herald:released"
#: Field of a retry-stream entry: the attempt its first delivery from there is.
ATTEMPT_FIELD = b"herald:attempt"
#: Consumers owning nothing and idle this long are removed from their group (ms).
_REAP_IDLE_MS = 600_000
_REAP_EVERY = 60.0
_TRIM_EVERY = 1.0
#: A publish is split into scripts of at most this many messages / bytes.
_CHUNK_MESSAGES = 5000
_CHUNK_BYTES = 4 * 1024 * 1024

#: Read batches through the READ script (one packed reply) instead of plain XREADGROUP when
#: redis-py parses replies in pure Python: see _redis_lua.READ.
_LUA_READ = not redis.utils.HIREDIS_AVAILABLE
_decode_packed = msgspec.msgpack.Decoder(list[tuple[int, bytes, list[bytes]]]).decode

#: servers already warned about, in this process, for keeping nothing on disk
_WARNED: set[tuple[str, int]] = set()

_encode_headers = msgspec.json.Encoder().encode
_decode_headers = msgspec.json.Decoder(dict[str, str]).decode
_decode_any_json = msgspec.json.Decoder().decode


class _RetryId(bytes):
    """The token of a delivery from a group's retry stream (a plain ``bytes`` token is an
    entry of the topic's stream)."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class _Options:
    host: str
    port: int
    db: int
    username: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)
    tls: bool = False
    visibility_timeout: float = 30.0
    claim_interval: float = 0.5
    retention: str = "keep"
    maxlen: int | None = None
    max_age: float | None = None
    reconnect_timeout: float = 30.0
    connect_timeout: float = 5.0
    socket_timeout: float = 10.0
    ssl: dict[str, Any] = field(default_factory=dict)


_SECONDS = {
    "visibility_timeout": 0.0,
    "claim_interval": 0.0,
    "max_age": 0.0,
    "connect_timeout": 0.0,
    "socket_timeout": 0.0,
}
_SSL_OPTIONS = (
    "ssl_ca_certs",
    "ssl_certfile",
    "ssl_keyfile",
    "ssl_cert_reqs",
    "ssl_check_hostname",
)
_KNOWN = sorted(
    [*_SECONDS, "reconnect_timeout", "retention", "maxlen", *_SSL_OPTIONS],
)


def _parse_url(url: str) -> _Options:
    """Parse and validate a ``redis://`` / ``rediss://`` URL; ``ValueError`` says what is wrong
    (never quoting the password)."""
    safe = redact_url(url) if isinstance(url, str) else repr(url)
    if not isinstance(url, str):
        raise ValueError(f"not a redis URL: {safe}")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise ValueError(f"malformed redis URL {safe!r}: {e}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("redis", "rediss"):
        raise ValueError(f"not a redis URL: {safe!r}; expected redis:// or rediss://")
    if parts.fragment:
        raise ValueError(f"redis URL {safe!r} must not have a #fragment")
    path = parts.path.strip("/")
    try:
        db = int(path) if path else 0
        if db < 0:
            raise ValueError
    except ValueError:
        raise ValueError(
            f"redis URL {safe!r}: the path must be a database number, like /0"
        ) from None
    options: dict[str, Any] = {}
    ssl: dict[str, Any] = {}
    try:
        pairs = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=True)
    except ValueError:
        raise ValueError(f"redis URL {safe!r} has a malformed query string") from None
    seen: set[str] = set()
    for name, raw in pairs if parts.query else []:
        if name in seen:
            raise ValueError(f"redis URL option {name!r} is given twice")
        seen.add(name)
        if name in _SECONDS:
            options[name] = _seconds(name, raw, allow_zero=False)
        elif name == "reconnect_timeout":
            options[name] = _seconds(name, raw, allow_zero=True)
        elif name == "maxlen":
            try:
                n = int(raw)
            except ValueError:
                n = 0
            if n < 1:
                raise ValueError(f"redis URL option maxlen={raw!r} must be a whole number >= 1")
            options[name] = n
        elif name == "retention":
            if raw not in ("keep", "acked"):
                raise ValueError(f"redis URL option retention={raw!r} must be keep or acked")
            options[name] = raw
        elif name in _SSL_OPTIONS:
            if scheme != "rediss":
                raise ValueError(f"redis URL option {name!r} needs rediss:// (TLS)")
            if name == "ssl_cert_reqs":
                if raw not in ("required", "optional", "none"):
                    raise ValueError(
                        f"redis URL option ssl_cert_reqs={raw!r} must be required, optional or none"
                    )
                ssl[name] = raw
            elif name == "ssl_check_hostname":
                if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(
                        f"redis URL option ssl_check_hostname={raw!r} must be true or false"
                    )
                ssl[name] = raw.lower() in ("true", "1", "yes")
            else:
                ssl[name] = raw
        else:
            raise ValueError(f"unknown redis URL option {name!r}; known: {', '.join(_KNOWN)}")
    if "maxlen" in options and "max_age" in options:
        raise ValueError("redis URL options maxlen and max_age exclude each other; choose one")
    return _Options(
        host=parts.hostname or "localhost",
        port=port or 6379,
        db=db,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password is not None else None,
        tls=scheme == "rediss",
        ssl=ssl,
        **options,
    )


def _seconds(name: str, raw: str, *, allow_zero: bool) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"redis URL option {name}={raw!r} is not a number of seconds") from None
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"redis URL option {name}={raw!r} must be a finite number {bound}")
    return value


def _consumer_name() -> str:
    host = socket.gethostname().replace(" ", "_")[:64] or "host"
    return f"{host}-{os.getpid()}-{secrets.token_hex(4)}"


def _fields(message: Message) -> list[str | bytes]:
    """The stream fields of ``message`` (see the module docs)."""
    f: list[str | bytes] = ["id", message.id, "payload", message.payload]
    if message.key is not None:
        f += ("key", message.key)
    if message.type is not None:
        f += ("type", message.type)
    if message.headers:
        f += ("headers", _encode_headers(message.headers))
    return f


def _raw_reply(response: Any, **options: Any) -> Any:
    return response


async def _exec(client: Any, *args: Any) -> Any:
    """``client.execute_command(*args)`` (untyped in redis-py)."""
    return await client.execute_command(*args)


async def _read(args: tuple[Any, ...], client: Any) -> Any:
    return await client.execute_command(*args)


def _str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _text(b: bytes) -> str:
    return b.decode("utf-8", "replace")


def _headers(raw: bytes) -> dict[str, str]:
    try:
        return _decode_headers(raw)
    except msgspec.DecodeError:
        # Written by another client: deliver it anyway rather than wedge the group on it.
        return {"invalid_headers": _text(raw)}


def _message(topic: str, eid: bytes, flat: list[bytes]) -> tuple[Message, int]:
    """Build the message of one stream entry; also return its ``herald:attempt`` (0: none)."""
    fields = dict(zip(flat[::2], flat[1::2], strict=False))
    payload = fields.pop(b"payload", None)
    mid = fields.pop(b"id", None)
    key = fields.pop(b"key", None)
    type_ = fields.pop(b"type", None)
    raw_headers = fields.pop(b"headers", None)
    attempt = fields.pop(ATTEMPT_FIELD, None)
    headers = _headers(raw_headers) if raw_headers else {}
    if fields:
        if payload is None:  # a plain client's entry: its fields are the payload
            payload = _encode_headers({_text(k): _text(v) for k, v in fields.items()})
        else:
            for k, v in fields.items():
                headers.setdefault(_text(k), _text(v))
    message = Message(
        id=mid.decode() if mid is not None else eid.decode(),
        topic=topic,
        payload=payload if payload is not None else b"{}",
        key=_text(key) if key is not None else None,
        type=_text(type_) if type_ is not None else None,
        headers=headers,
    )
    try:
        base = int(attempt) if attempt is not None else 0
    except ValueError:
        base = 0
    return message, base


def _is_nogroup(e: ResponseError) -> bool:
    """The group or its stream is gone ("UNBLOCKED the stream key no longer exists": deleted
    while a blocking read waited on it)."""
    head = str(e)[:60]
    return "NOGROUP" in head or head.startswith("UNBLOCKED")


async def _exists(key: str, client: Any) -> bool:
    return bool(await client.exists(key))


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
    )

    def __init__(self, options: _Options, url: str) -> None:
        self._options = options
        self._url = redact_url(url)
        self._client: aioredis.Redis | None = None
        self._shas: dict[str, str] = {}
        self._subscriptions: set[RedisSubscription] = set()
        #: (topic, group) -> counter bumped when this process released deliveries or parked a
        #: delayed one, so local members of the group look (claim) again at once.
        self._kicks: dict[tuple[str, str], int] = {}
        self._closed = False

    @classmethod
    def from_url(cls, url: str) -> RedisTransport:
        return cls(_parse_url(url), url)

    def __repr__(self) -> str:
        return f"RedisTransport({self._url!r})"

    @property
    def url(self) -> str:
        return self._url

    # --- lifecycle -------------------------------------------------------------------------

    def _new_client(self) -> aioredis.Redis:
        o = self._options
        kwargs: dict[str, Any] = {}
        if o.tls:
            kwargs["ssl"] = True
            kwargs.update(o.ssl)
        client = aioredis.Redis(
            host=o.host,
            port=o.port,
            db=o.db,
            username=o.username,
            password=o.password,
            socket_connect_timeout=o.connect_timeout,
            socket_timeout=o.socket_timeout,
            retry=Retry(NoBackoff(), 0),  # retries are ours (_call), bounded by time
            protocol=2,
            decode_responses=False,
            **kwargs,
        )
        # Raw replies: the hot path converts them itself.
        callbacks: Any = client  # typeshed-less: redis-py's callback protocol is loose
        callbacks.set_response_callback("XREADGROUP", _raw_reply)
        return client

    async def connect(self) -> None:
        """Connect and check the server; :class:`TransportError` (password redacted) if Redis
        cannot be reached, refuses the credentials or is older than 6.2."""
        if self._closed:
            raise TransportError(f"redis transport for {self._url} is closed")
        if self._client is not None:
            return
        client = self._new_client()
        try:
            with anyio.fail_after(self._options.connect_timeout + self._options.socket_timeout):
                info = await client.info("server")
                version = str(info.get("redis_version", "0"))
                major_minor = tuple(int(x) for x in version.split(".")[:2] if x.isdigit())
                if major_minor < (6, 2):
                    raise TransportError(
                        f"redis at {self._url} is version {version}; Herald needs 6.2 or later"
                    )
                await self._warn_if_volatile(client)
        except TransportError:
            await client.aclose()
            raise
        except (RedisError, OSError, TimeoutError) as e:
            await client.aclose()
            raise TransportError(
                f"cannot connect to redis at {self._url}: {self._clean(e)}"
            ) from None
        if self._client is not None or self._closed:  # a concurrent connect() won
            await client.aclose()
            return
        self._client = client

    async def _warn_if_volatile(self, client: aioredis.Redis) -> None:
        try:
            config: dict[Any, Any] = dict(await client.config_get("appendonly"))
            config.update(await client.config_get("save"))
        except RedisError:
            return  # CONFIG may be disabled (managed Redis); nothing to say then
        appendonly = config.get(b"appendonly", config.get("appendonly"))
        save = config.get(b"save", config.get("save"))
        server = (self._options.host, self._options.port)
        if appendonly in (b"no", "no") and save in (b"", "") and server not in _WARNED:
            _WARNED.add(server)  # once per server and process
            log.warning(
                'redis at %s keeps nothing on disk (appendonly no, save ""): a restart of '
                "the server loses every message",
                self._url,
            )

    async def close(self) -> None:
        """Close every subscription (releasing unacked deliveries) and the connections."""
        if self._closed:
            return
        self._closed = True
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
        text = str(e) or type(e).__name__
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
                return await _exec(client, "EVALSHA", sha, len(keys), *keys, *args)
            except NoScriptError:
                pass
        loaded = await client.script_load(body)
        sha = loaded.decode() if isinstance(loaded, bytes) else str(loaded)
        self._shas[body] = sha
        return await _exec(client, "EVALSHA", sha, len(keys), *keys, *args)

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
            r = record(_fields(m))
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
        self, topic: str, group: str, *, start: Start = "earliest"
    ) -> RedisSubscription:
        validate_name("topic", topic)
        validate_name("group", group)
        if start not in ("earliest", "latest"):
            raise ValueError(f"start must be 'earliest' or 'latest', not {start!r}")
        self._require()
        sub = RedisSubscription(self, topic, group)
        await sub._create_groups("0" if start == "earliest" else "$")
        self._subscriptions.add(sub)
        return sub

    async def delete_topic(self, topic: str) -> None:
        """Delete the topic's stream, its groups' delayed sets and retry streams, and the
        dead-letter and skipped topics (``<topic>.<group>.dlq`` / ``.skipped``) of its groups.
        A missing topic is not an error; a key of that name that is not a stream is refused."""
        validate_name("topic", topic)
        await self._delete(topic, depth=0)

    async def _delete(self, topic: str, depth: int) -> None:
        registry = _groups_key(topic)

        async def op(client: aioredis.Redis) -> list[str]:
            kind = await client.type(topic)
            kind = kind.decode() if isinstance(kind, bytes) else str(kind)
            if kind not in ("stream", "none"):
                raise TransportError(
                    f"redis at {self._url}: key {topic!r} is a {kind}, not a Herald topic"
                )
            groups = {_str(g) for g in await client.smembers(registry)}
            if kind == "stream":
                for info in await client.xinfo_groups(topic):
                    entry: dict[Any, Any] = dict(info)
                    groups.add(_str(entry.get("name", entry.get(b"name", b""))))
            keys = [topic, registry]
            for g in sorted(groups):
                keys += [_retry_key(topic, g), _delayed_key(topic, g)]
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


def _groups_key(topic: str) -> str:
    return f"herald:{{{topic}}}:groups"


def _retry_key(topic: str, group: str) -> str:
    return f"herald:{{{topic}}}:retry:{group}"


def _delayed_key(topic: str, group: str) -> str:
    return f"herald:{{{topic}}}:delayed:{group}"


class RedisSubscription(Subscription):
    """One consumer of ``group`` on ``topic``."""

    def __init__(self, transport: RedisTransport, topic: str, group: str) -> None:
        self.topic = topic
        self.group = group
        self.consumer = _consumer_name()
        self._t = transport
        self._topic_b = topic.encode()
        self._retry = _retry_key(topic, group)
        self._delayed = _delayed_key(topic, group)
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
            pipe.sadd(_groups_key(topic), group)
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
        if not _is_nogroup(e):
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
                    message, _ = _message(topic, eid, flat)
                    out.append(Delivery(message, 1, eid))
            else:
                for eid, flat in entries:
                    if flat is None:
                        continue
                    message, base = _message(topic, eid, flat)
                    out.append(Delivery(message, base or 1, _RetryId(eid)))
        return out

    def _unpack(self, packed: bytes) -> list[Delivery]:
        """Deliveries from a READ script reply."""
        topic = self.topic
        out: list[Delivery] = []
        for which, eid, flat in _decode_packed(packed):
            message, base = _message(topic, eid, flat)
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
            message, _ = _message(topic, eid, flat)
            out.append(Delivery(message, max(1, int(count)), eid))
        for eid, flat, count in retry:
            message, base = _message(topic, eid, flat)
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
                await _exec(client, "XACK", topic, group, *main)
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
            copy = _fields(delivery.message)
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
                if not _is_nogroup(e):
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
