"""NATS JetStream: ``nats://`` (plain TCP) and ``tls://`` (TLS), with nats-py.

URL
    ``nats://[user:password@ | token@]host[:port][?options]`` (default port 4222); ``tls://``
    is the same over TLS. One server per URL. Credentials go to the server in the CONNECT
    handshake, never into a server URL, a log line or an error (``url`` shows ``***``).

Query options
    ``ack_wait`` (seconds, default 30): the visibility timeout. A delivery neither acked nor
    nacked is redelivered after this long (a crashed consumer). Set on the durable consumer;
    a later subscriber with another value updates it for the whole group.
    ``storage`` (``file`` default | ``memory``); ``retention`` (only ``limits``);
    ``max_age`` (seconds, 0 = forever, default), ``max_bytes``, ``max_msgs`` (-1 = no limit,
    default), ``duplicate_window`` (seconds, default 120), ``replicas`` (default 1): the
    stream's limits, applied when the transport creates the stream (an existing stream is
    used as it is). ``max_ack_pending`` (default 20000): unacked deliveries per group.
    ``connect_timeout`` (seconds, default 2) and ``connect_attempts`` (default 3): connecting
    fails with :class:`TransportError` after that many attempts, 0.5 s apart (about 7 s with
    the defaults when the port does not answer; at once-ish when it is refused).
    ``timeout`` (seconds, default 5): one request (API call, PubAck, ack confirmation).
    ``retry_timeout`` (seconds, default 30): how long publish/ack/nack retry through a lost
    connection before raising :class:`TransportError`.
    ``name`` (connection name), ``creds`` (a ``.creds`` file), ``nkey`` (an nkey seed file),
    ``tls_ca``, ``tls_cert``, ``tls_key`` (PEM files; any of them turns TLS on).

TLS
    ``tls://`` (or any ``tls_*`` option) verifies the server's certificate against the system
    CAs, or only against ``tls_ca`` when given (e.g. a self-signed certificate:
    ``tls://app:secret@127.0.0.1:4222?tls_ca=/etc/nats/ca.pem``); the host name or IP of the
    URL must match the certificate. ``tls_cert`` + ``tls_key`` are the client certificate for
    a server that verifies clients. Before nats-py sends any credentials, ``connect()`` reads
    the server's INFO and does the TLS handshake on a short connection of its own: a server
    that offers no TLS, a certificate the client does not trust or a refused client
    certificate fails at once with :class:`TransportError`. A ``nats://`` URL against a server
    that requires TLS is upgraded the same way (nats-py's behaviour), with the system CAs.
    Even a server that accepts connections and then never answers (where nats-py can hang
    after a failed TLS upgrade) ends ``connect()`` with :class:`TransportError` within
    ``connect_attempts`` x (4 x ``connect_timeout`` + 0.5 s) + 5 x ``connect_timeout``.

Mapping onto JetStream
    * topic -> one stream per topic, created on first publish or subscribe. Stream name: the
      topic with ``.`` replaced by ``~`` (stream names cannot contain ``.``; ``~`` cannot occur
      in a Herald name, so the mapping is one-to-one): ``orders.created`` ->
      ``orders~created``. Subject: the topic itself (``orders.created``), except for a topic
      with an empty token (``a..b``, ``a.``), which uses its stream name as subject.
      File storage, limits retention, discard old, deduplication window 2 minutes.
    * group -> durable pull consumer on that stream, named like streams (``.`` -> ``~``);
      explicit ack, ``deliver_policy`` ``all`` (``start="earliest"``) or ``new``
      (``"latest"``), ``max_deliver`` unlimited (Herald's retry policy decides when to
      dead-letter), ``ack_wait`` from the URL.
    * fetch -> pull requests (``$JS.API.CONSUMER.MSG.NEXT``) with ``batch`` = max and
      ``expires`` = the fetch timeout (``no_wait`` for timeout 0); one request at a time per
      subscription, on its own inbox. Deliveries that arrive after a fetch returned (the request
      was still open) are kept for the next fetch, and go back on close.
    * ack -> ``+ACK``, batched: every ack of the batch is sent, the last one as a request whose
      reply confirms the server processed them all (acks of one consumer are processed in
      order), so an ack is durable when ``ack()`` returns.
      nack(delay) -> ``-NAK {"delay": ns}``, confirmed the same way. ``term`` is not used:
      the contract has no such outcome (a dead letter is published, then the original acked).
    * attempt -> the JetStream delivery count from the ack subject's metadata: it grows with
      every nak and every ack-wait redelivery.
    * close -> every delivery handed out and not acked, and every one still buffered, is
      nak'd at once (after the inbox is drained, so nothing is in flight).
    * publish -> all messages of the batch are sent at once, each with a reply inbox, then every
      PubAck is awaited together; messages whose PubAck did not come (timeout, no responders
      while the server restarts, lost connection) are sent again with the same
      ``Nats-Msg-Id``, so the server's deduplication keeps one copy.

Wire format (one NATS message per Herald message)
    * subject: see above; payload: ``Message.payload``, byte for byte.
    * header ``Nats-Msg-Id``: ``Message.id`` (also the deduplication id).
    * header ``Herald-Key``: ``Message.key``; ``Herald-Type``: ``Message.type`` (absent = None).
    * every other Herald header travels as a header of the same name and value, e.g.
      ``correlation_id``, ``occurred_at``, ``content_type``, ``source``, ``hops``.
    * an entry that cannot be a plain header line (a name that is not an RFC 7230 token or
      starts with ``Nats-``/``Herald-``; a value with control characters such as a newline, or
      leading/trailing spaces) travels instead inside ``Herald-Headers``: one JSON object
      (ASCII, escaped) of name -> value, merged over the plain headers on receipt.
    * receiving a message without ``Nats-Msg-Id`` (a plain client's), the id is
      ``nats:<topic>:<stream sequence>``; without ``Herald-Key``/``Herald-Type``, key and type
      are None; other headers become Herald headers as they are.

    A plain nats-py client publishes with ``await js.publish("orders", b'{"id": 1}')`` once the
    stream exists (Herald creates it on first publish or subscribe) and reads Herald messages
    with any JetStream consumer on stream ``orders``: ``msg.data`` is the payload, and
    ``msg.headers`` holds ``Nats-Msg-Id``, ``Herald-Type``, ``correlation_id``...

Durability: PubAck means the server stored the message in its file store; NATS 2.9 fsyncs
that store periodically (``sync_interval``, 2 minutes by default), so a message survives a
restart of the server process but not necessarily a power cut on an unreplicated stream.

Connection loss: nats-py reconnects forever (0.5 s between attempts), logging each disconnect
and reconnect; open pull requests are forgotten and re-sent by the next fetch, publishes and
acks are retried (for ``retry_timeout``), consumers resume on their own.

Limits: headers count towards the server's ``max_payload`` (1 MiB by default), so
``features.max_payload`` is the server's limit (read from its INFO on connect) minus 16 KiB
kept for headers; a message over the server's limit raises :class:`PayloadTooLarge` before
anything is sent. Only an asyncio event loop is supported (nats-py is asyncio-only).
``delete_topic(t)`` also deletes every stream ``<t>.<group>.dlq`` / ``.skipped`` on the server
(by name, so also dead-letter streams of a topic ``t.x`` with a group ``g``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from functools import partial
from typing import Any, ClassVar, TypeVar

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription as NatsSub
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.manager import JetStreamManager

from herald.message import Message
from herald.transports.base import (
    Features,
    GroupInfo,
    Start,
    Subscription,
    TopicInfo,
    Transport,
    TransportError,
    check_peek,
    validate_name,
)
from herald.transports.nats import listing, peek
from herald.transports.nats.options import NatsOptions, parse_url
from herald.transports.nats.subscription import (
    TRANSIENT as _TRANSIENT,
)
from herald.transports.nats.subscription import (
    NatsSubscription,
)
from herald.transports.nats.subscription import (
    quiet as _quiet,
)
from herald.transports.nats.wire import consumer_name, encode_headers, stream_name, subject_for

__all__ = ["NatsSubscription", "NatsTransport", "PayloadTooLarge"]

log = logging.getLogger("herald.transports.nats")

T = TypeVar("T")

HEADER_RESERVE = 16 * 1024  # bytes of max_payload kept for headers in features.max_payload
_DEFAULT_MAX_PAYLOAD = 1024 * 1024  # NATS default, until the server's INFO says otherwise
_RECONNECT_WAIT = 0.5
# err_codes of the JetStream API
_STREAM_NOT_FOUND = 10059
_CONSUMER_NOT_FOUND = 10014
_CONSUMER_EXISTS = 10013
_CONSUMER_NAME_EXISTS = 10148
_SUBJECTS_OVERLAP = 10065
#: what nats-py raises when its connect attempts are used up (the reason is in error_cb)
_GAVE_UP = nats.errors.NoServersError
_CONNECT_REASONS = 3  # distinct errors of the connect attempts named in connect()'s error


class PayloadTooLarge(TransportError, ValueError):
    """A message (payload plus headers) is larger than the server's ``max_payload``."""


class NatsTransport(Transport):
    """A connection to one NATS server with JetStream; see the module docstring."""

    schemes: ClassVar[tuple[str, ...]] = ("nats", "tls")

    def __init__(self, options: NatsOptions) -> None:
        self._opts = options
        self._safe_url = options.safe_url()
        self._server_max = _DEFAULT_MAX_PAYLOAD
        self.features = self._features()
        self._nc: Client | None = None
        self._jsm: JetStreamManager | None = None
        #: topic -> (stream, subject) of streams known to exist
        self._streams: dict[str, tuple[str, str]] = {}
        self._subs: set[NatsSubscription] = set()
        self._ack_prefix = ""
        self._ack_sub: NatsSub | None = None
        self._ack_waiters: dict[str, asyncio.Future[str | None]] = {}
        self._next_token = 0
        self._error_logged = False
        #: what nats-py reported through error_cb during connect(), for its error message
        self._connect_errors: list[str] = []

    def _features(self) -> Features:
        return Features(
            persistent=self._opts.storage == "file",
            cross_process=True,
            ordered_per_key=True,
            native_delay=True,
            replay=True,
            headers=True,
            max_payload=self._server_max - HEADER_RESERVE,
            dedupes_by_id=True,
            listing=True,
        )

    @classmethod
    def from_url(cls, url: str) -> NatsTransport:
        return cls(parse_url(url))

    @property
    def url(self) -> str:
        return self._safe_url

    # --- connection ------------------------------------------------------------------------

    def _tls_context(self) -> ssl.SSLContext | None:
        o = self._opts
        if not (o.tls or o.tls_ca or o.tls_cert or o.tls_key):
            return None
        ctx = ssl.create_default_context(cafile=o.tls_ca)
        if o.tls_cert:
            ctx.load_cert_chain(o.tls_cert, o.tls_key)
        return ctx

    async def connect(self) -> None:
        """Connect, retrying ``connect_attempts`` times; then reconnect forever on loss."""
        if self._nc is not None:
            return
        o = self._opts
        try:
            tls = self._tls_context()
        except (OSError, ssl.SSLError) as e:
            raise TransportError(f"{self._safe_url}: cannot load TLS files: {e}") from None
        server = f"{'tls' if tls else 'nats'}://{o.host}:{o.port}"
        kwargs: dict[str, Any] = {}
        if o.user is not None:
            kwargs.update(user=o.user, password=o.password)
        if o.token is not None:
            kwargs["token"] = o.token
        if o.creds:
            kwargs["user_credentials"] = o.creds
        if o.nkey:
            kwargs["nkeys_seed"] = o.nkey
        self._error_logged = False
        self._connect_errors = []
        await self._probe_tls(tls)
        kwargs.update(
            servers=[server],
            name=o.name,
            tls=tls,
            # seconds; nats-py annotates these as int but takes any number
            connect_timeout=o.connect_timeout,
            reconnect_time_wait=_RECONNECT_WAIT,
            allow_reconnect=True,
            # nats-py tries (1 + this) times per server on the initial connect; raised to
            # "forever" below once connected
            max_reconnect_attempts=o.connect_attempts - 1,
            error_cb=self._on_error,
            disconnected_cb=self._on_disconnected,
            reconnected_cb=self._on_reconnected,
            pending_size=64 * 1024 * 1024,  # buffered while reconnecting
        )
        nc = Client()
        try:
            await asyncio.wait_for(nc.connect(**kwargs), self._connect_deadline())
        except Exception as e:
            # nats-py ends with "no servers available" (or hangs until our deadline); the
            # errors of the attempts say why, e.g. an Authorization Violation from the server
            # followed by a reset connection
            reasons = self._connect_errors
            if not (isinstance(e, (_GAVE_UP, TimeoutError)) and reasons):
                reasons = [f"{type(e).__name__}: {_describe(e)}"]
            error = TransportError(
                f"cannot connect to NATS at {self._safe_url} after {o.connect_attempts} "
                f"attempt(s): {'; '.join(reasons)}"
            )
            with _quiet():
                await asyncio.wait_for(nc.close(), o.connect_timeout)
            raise error from None
        nc.options["max_reconnect_attempts"] = -1  # never give up on a lost connection
        self._nc = nc
        self._jsm = nc.jsm(timeout=o.timeout)
        self._server_max = int(nc.max_payload or _DEFAULT_MAX_PAYLOAD)
        self.features = self._features()
        try:
            await self._api("check JetStream", self._jsm.account_info)
            self._ack_prefix = nc.new_inbox() + "."
            self._ack_sub = await nc.subscribe(
                self._ack_prefix + "*", cb=self._on_puback, pending_msgs_limit=-1
            )
        except BaseException:
            await self.close()
            raise

    def _connect_deadline(self) -> float:
        """An upper bound for nats-py's initial connect: per attempt the TCP connect, INFO, TLS
        handshake and PONG each take at most ``connect_timeout``, plus the wait between
        attempts. nats-py can hang on a failed TLS upgrade (nats-io/nats.py#718); this ends
        that with a TransportError instead."""
        o = self._opts
        return o.connect_attempts * (4 * o.connect_timeout + _RECONNECT_WAIT) + o.connect_timeout

    async def _probe_tls(self, tls: ssl.SSLContext | None) -> None:
        """Check TLS before nats-py sends credentials, on a short connection of our own.

        nats-py upgrades to TLS only when the server requires it, so against a server without
        TLS a ``tls://`` URL would send credentials in the clear: read the server's INFO line
        and refuse. When TLS is on (asked for, or required by the server, which nats-py then
        honours with the system CAs), do the TLS handshake: a certificate the client does not
        trust, or a client certificate the server refuses, fails at once with a clear
        TransportError; nats-py would retry it, then can hang (nats-io/nats.py#718).
        """
        o = self._opts
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(o.host, o.port), o.connect_timeout
            )
        except (OSError, TimeoutError):
            return  # unreachable: connect() reports it after its attempts
        try:
            line = await asyncio.wait_for(reader.readline(), o.connect_timeout)
            info = json.loads(line.partition(b" ")[2] or b"{}")
            if not isinstance(info, dict):
                return
            offered = bool(info.get("tls_required") or info.get("tls_available"))
            if tls is not None and not offered:
                raise TransportError(
                    f"{self._safe_url}: TLS requested but the server does not offer TLS; "
                    "not sending credentials in the clear (use nats:// for a plain connection)"
                )
            if tls is None and not info.get("tls_required"):
                return  # plain connection
            context = tls if tls is not None else ssl.create_default_context()
            await asyncio.wait_for(
                writer.start_tls(context, server_hostname=o.host), o.connect_timeout
            )
        except ssl.SSLError as e:  # before OSError: SSLError is one
            raise TransportError(
                f"cannot connect to NATS at {self._safe_url}: TLS handshake failed: "
                f"{type(e).__name__}: {_describe(e)}"
            ) from None
        except (OSError, TimeoutError, ValueError):
            return  # odd or slow: connect() below reports it
        finally:
            # not wait_closed(): after a failed start_tls it may never complete
            writer.close()

    async def close(self) -> None:
        for sub in list(self._subs):
            await sub.close()
        nc, self._nc = self._nc, None
        self._jsm = None
        for fut in self._ack_waiters.values():
            if not fut.done():
                fut.cancel()
        self._ack_waiters.clear()
        if nc is not None:
            with _quiet():
                await asyncio.wait_for(nc.close(), self._opts.timeout)

    def _require(self) -> Client:
        if self._nc is None:
            raise TransportError(f"{self._safe_url} is not connected: call connect() first")
        return self._nc

    async def _on_error(self, e: Exception) -> None:
        # nats-py reports every failed reconnect attempt: log the first loudly, the rest quietly
        level = logging.DEBUG if self._error_logged else logging.WARNING
        self._error_logged = True
        reason = f"{type(e).__name__}: {_describe(e)}"
        reasons = self._connect_errors
        if self._nc is None and len(reasons) < _CONNECT_REASONS and reason not in reasons:
            reasons.append(reason)  # still in connect()
        log.log(level, "NATS %s: %s", self._safe_url, reason)

    async def _on_disconnected(self) -> None:
        if self._nc is not None:
            log.warning("NATS %s: connection lost; reconnecting", self._safe_url)
        for sub in self._subs:
            sub._connection_lost()

    async def _on_reconnected(self) -> None:
        self._error_logged = False
        log.warning("NATS %s: reconnected", self._safe_url)
        for sub in self._subs:
            sub._connection_lost()

    # --- JetStream API ---------------------------------------------------------------------

    async def _api(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        """Run one JetStream API call, retrying while the server is unreachable."""
        deadline = asyncio.get_running_loop().time() + self._opts.retry_timeout
        delay = 0.05
        while True:
            try:
                return await call()
            except nats.js.errors.APIError:
                raise
            except _TRANSIENT as e:
                if asyncio.get_running_loop().time() + delay > deadline:
                    raise TransportError(
                        f"NATS {self._safe_url}: {what} failed for {self._opts.retry_timeout}s: "
                        f"{type(e).__name__}: {_describe(e)} (is JetStream enabled?)"
                    ) from None
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

    async def _stream(self, topic: str) -> tuple[str, str]:
        """Return ``(stream, subject)`` of ``topic``, creating the stream if needed."""
        known = self._streams.get(topic)
        if known is not None:
            return known
        validate_name("topic", topic)
        self._require()
        jsm = self._jsm
        assert jsm is not None
        name, subject = stream_name(topic), subject_for(topic)
        try:
            await self._api(f"look up stream {name!r}", lambda: jsm.stream_info(name))
        except nats.js.errors.NotFoundError:
            o = self._opts
            config = StreamConfig(
                name=name,
                subjects=[subject],
                retention=RetentionPolicy.LIMITS,
                storage=StorageType.FILE if o.storage == "file" else StorageType.MEMORY,
                discard=DiscardPolicy.OLD,
                max_age=o.max_age,
                max_bytes=o.max_bytes,
                max_msgs=o.max_msgs,
                duplicate_window=o.duplicate_window,
                num_replicas=o.replicas,
            )
            try:
                await self._api(f"create stream {name!r}", lambda: jsm.add_stream(config))
            except nats.js.errors.APIError as e:
                if e.err_code == _SUBJECTS_OVERLAP:
                    raise TransportError(
                        f"NATS {self._safe_url}: subject {subject!r} of topic {topic!r} is "
                        f"already captured by another stream; Herald needs stream {name!r} "
                        f"for it ({e.description})"
                    ) from None
                # created meanwhile by another process with other limits: use it as it is
                await self._api(f"look up stream {name!r}", lambda: jsm.stream_info(name))
        except nats.js.errors.APIError as e:
            raise TransportError(f"NATS {self._safe_url}: stream {name!r}: {e}") from None
        self._streams[topic] = (name, subject)
        return name, subject

    async def _consumer(self, stream: str, group: str, start: Start) -> str:
        """Ensure the durable consumer of ``group`` exists; return its name."""
        jsm = self._jsm
        assert jsm is not None
        o = self._opts
        name = consumer_name(group)
        try:
            info = await self._api(
                f"look up group {group!r}", lambda: jsm.consumer_info(stream, name)
            )
        except nats.js.errors.NotFoundError:
            info = None
        if info is not None:
            cfg = info.config
            if cfg.ack_wait != o.ack_wait or cfg.max_ack_pending != o.max_ack_pending:
                cfg.ack_wait, cfg.max_ack_pending = o.ack_wait, o.max_ack_pending
                try:
                    await self._api(
                        f"update group {group!r}", lambda: jsm.add_consumer(stream, cfg)
                    )
                except nats.js.errors.APIError as e:
                    log.warning("NATS: could not update ack_wait of group %r: %s", group, e)
            return name
        config = ConsumerConfig(
            durable_name=name,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL if start == "earliest" else DeliverPolicy.NEW,
            ack_wait=o.ack_wait,
            max_deliver=-1,
            max_ack_pending=o.max_ack_pending,
        )
        try:
            await self._api(f"create group {group!r}", lambda: jsm.add_consumer(stream, config))
        except nats.js.errors.APIError as e:
            # joined meanwhile by another member: its configuration wins
            if e.err_code not in (_CONSUMER_EXISTS, _CONSUMER_NAME_EXISTS):
                raise TransportError(
                    f"NATS {self._safe_url}: cannot create group {group!r}: {e}"
                ) from None
        return name

    # --- publish ---------------------------------------------------------------------------

    async def _on_puback(self, msg: Msg) -> None:
        fut = self._ack_waiters.pop(msg.subject[len(self._ack_prefix) :], None)
        if fut is None or fut.done():
            return
        headers = msg.headers
        if headers and "Status" in headers:  # 503: no stream (yet) or JetStream not ready
            fut.set_result(f"status {headers['Status']}")
            return
        data = msg.data
        if b'"error"' in data:
            try:
                err = json.loads(data)["error"]
                fut.set_result(f"error {err.get('err_code')}: {err.get('description')}")
            except (ValueError, KeyError, TypeError, AttributeError):
                fut.set_result(f"error {data[:200]!r}")
            return
        fut.set_result(None)

    async def publish(self, topic: str, messages: Sequence[Message]) -> None:
        """Send the batch at once and await every PubAck; resend what was not acknowledged
        (same ``Nats-Msg-Id``, so deduplicated) until ``retry_timeout``."""
        nc = self._require()
        _, subject = await self._stream(topic)
        if not messages:
            return
        limit = self._server_max
        frames: list[tuple[bytes, dict[str, str]]] = []
        for m in messages:
            headers = encode_headers(m)
            size = (
                len(m.payload) + 12 + sum(len(k) + len(v.encode()) + 4 for k, v in headers.items())
            )
            if size > limit:
                raise PayloadTooLarge(
                    f"message {m.id} on {topic!r} is {size:,} bytes with its headers, over the "
                    f"NATS server's max_payload of {limit:,} bytes ({self._safe_url})"
                )
            frames.append((m.payload, headers))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._opts.retry_timeout
        todo = list(range(len(frames)))
        delay = 0.05
        waiters = self._ack_waiters
        while True:
            futures: dict[str, tuple[int, asyncio.Future[str | None]]] = {}
            failure = ""
            try:
                for i in todo:
                    self._next_token += 1
                    token = str(self._next_token)
                    fut: asyncio.Future[str | None] = loop.create_future()
                    waiters[token] = fut
                    futures[token] = (i, fut)
                    payload, headers = frames[i]
                    await nc.publish(subject, payload, self._ack_prefix + token, headers)
                remaining = max(0.01, min(self._opts.timeout, deadline - loop.time()))
                await asyncio.wait([f for _, f in futures.values()], timeout=remaining)
            except _TRANSIENT as e:
                failure = f"{type(e).__name__}: {_describe(e)}"
            finally:
                for token in futures:
                    waiters.pop(token, None)
            again: list[int] = []
            stream_gone = False
            for i, fut in futures.values():
                if not fut.done():
                    again.append(i)
                    failure = failure or "no PubAck in time"
                    fut.cancel()
                    continue
                result = fut.result()
                if result is None:
                    continue
                if result.startswith("status"):  # no responders: restarting, or stream gone
                    again.append(i)
                    stream_gone = True
                    failure = result
                else:
                    raise TransportError(
                        f"NATS {self._safe_url} refused a message on {topic!r}: {result}"
                    )
            again += todo[len(futures) :]  # not sent at all (the loop above was interrupted)
            if not again:
                return
            if loop.time() + delay > deadline:
                raise TransportError(
                    f"NATS {self._safe_url}: {len(again)} of {len(frames)} messages on "
                    f"{topic!r} not acknowledged within {self._opts.retry_timeout}s ({failure})"
                )
            log.debug("NATS: resending %d messages on %r (%s)", len(again), topic, failure)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)
            if stream_gone and nc.is_connected:
                self._streams.pop(topic, None)
                _, subject = await self._stream(topic)
            todo = sorted(again)

    # --- groups ----------------------------------------------------------------------------

    async def subscribe(self, topic: str, group: str, *, start: Start = "earliest") -> Subscription:
        nc = self._require()
        validate_name("topic", topic)
        validate_name("group", group)
        if start not in ("earliest", "latest"):
            raise ValueError(f"start must be 'earliest' or 'latest', not {start!r}")
        stream, _ = await self._stream(topic)
        consumer = await self._consumer(stream, group, start)
        sub = NatsSubscription(self, nc, topic, group, stream, consumer)
        await sub._open()
        self._subs.add(sub)
        return sub

    # --- read-only tooling -------------------------------------------------------------------

    def peek(
        self, topic: str, *, last: int = 0
    ) -> AbstractAsyncContextManager[AsyncIterator[Message]]:
        """An ephemeral consumer without acks (see :mod:`herald.transports.nats.peek`)."""
        check_peek(self, topic, last)
        self._require()
        return peek.peek(self, topic, last)

    async def list_topics(self) -> list[TopicInfo]:
        self._require()
        jsm = self._jsm
        assert jsm is not None
        try:
            return await self._api("list streams", lambda: listing.topics(jsm))
        except nats.js.errors.APIError as e:
            raise TransportError(f"NATS {self._safe_url}: cannot list streams: {e}") from None

    async def list_groups(self, topic: str) -> list[GroupInfo]:
        validate_name("topic", topic)
        self._require()
        jsm = self._jsm
        assert jsm is not None
        try:
            return await self._api("list consumers", lambda: listing.groups(jsm, topic))
        except nats.js.errors.APIError as e:
            raise TransportError(f"NATS {self._safe_url}: cannot list consumers: {e}") from None

    async def _confirm(self, subjects: Sequence[str], body: bytes, what: str) -> None:
        """Send ``body`` to each ack subject; the last as a request whose reply confirms that
        the server processed all of them (one consumer's acks are processed in order)."""
        nc = self._require()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._opts.retry_timeout
        delay = 0.05
        while True:
            try:
                for s in subjects[:-1]:
                    await nc.publish(s, body)
                await nc.request(subjects[-1], body, timeout=self._opts.timeout)
                return
            except _TRANSIENT as e:
                if loop.time() + delay > deadline:
                    raise TransportError(
                        f"NATS {self._safe_url}: {what} of {len(subjects)} deliveries not "
                        f"confirmed within {self._opts.retry_timeout}s: {type(e).__name__}"
                    ) from None
                log.debug("NATS: retrying %s of %d deliveries (%r)", what, len(subjects), e)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
                nc = self._require()

    async def delete_topic(self, topic: str) -> None:
        """Delete the topic's stream (with its consumers) and its ``<topic>.*.dlq`` /
        ``.skipped`` streams. A missing topic is not an error."""
        validate_name("topic", topic)
        nc = self._require()
        jsm = self._jsm
        assert jsm is not None
        base = stream_name(topic)
        names = [base]
        for name in await self._stream_names(nc):
            if name.startswith(base + "~") and name.endswith(("~dlq", "~skipped")):
                names.append(name)
        for name in names:
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await self._api(f"delete stream {name!r}", partial(jsm.delete_stream, name))
        gone = set(names)
        for t, (s, _) in list(self._streams.items()):
            if s in gone:
                del self._streams[t]

    async def _stream_names(self, nc: Client) -> list[str]:
        names: list[str] = []
        while True:
            req = json.dumps({"offset": len(names)}).encode()
            resp = await self._api(
                "list streams",
                partial(nc.request, "$JS.API.STREAM.NAMES", req, timeout=self._opts.timeout),
            )
            page = json.loads(resp.data)
            if "error" in page:
                raise TransportError(f"NATS {self._safe_url}: list streams: {page['error']}")
            got = page.get("streams") or []
            names += got
            if not got or len(names) >= page.get("total", 0):
                return names


def _describe(e: BaseException) -> str:
    text = str(e) or ("timed out" if isinstance(e, TimeoutError) else type(e).__name__)
    return text[:300]
