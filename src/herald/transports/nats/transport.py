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
    ``connect_timeout`` (seconds, default 10): the budget of ``connect()``, the same on every
    transport (:mod:`herald.transports.connecting`): an unreachable server, or one whose
    JetStream does not answer yet, is tried again within it, then one
    :class:`TransportError` names the URL, the budget and the cause. Refused credentials
    ("Authorization Violation"), an unreadable or malformed ``creds``/``nkey`` file, a TLS
    mismatch and an account without JetStream raise
    :class:`~herald.transports.base.PermanentTransportError` at once.
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
    a server that verifies clients. Before any credentials are sent, TLS is checked on a
    connection of Herald's own (:mod:`herald.transports.nats.connection`): no TLS offered, an
    untrusted certificate or a refused client certificate fail at once. A ``nats://`` URL
    against a server that requires TLS is upgraded (nats-py's behaviour), with the system CAs.

Mapping onto JetStream
    * topic -> one stream per topic, created on first publish or subscribe. Stream name: the
      topic with ``.`` replaced by ``~`` (stream names cannot contain ``.``; ``~`` cannot occur
      in a Herald name, so the mapping is one-to-one): ``orders.created`` ->
      ``orders~created``. Subject: the topic itself (``orders.created``), except for a topic
      with an empty token (``a..b``, ``a.``), which uses its stream name as subject.
      File storage, limits retention, discard old, deduplication window 2 minutes. When a
      stream made by someone else already captures the subject (``orders.>`` for topic
      ``orders.new``), that stream is the topic's, used as it is: Herald reads and publishes
      through it (``topology``).
    * bind -> ``subscribe(bind=["sensors.*"])``: one subject pattern (NATS 2.9 consumers filter
      on one subject) that matches the topic's own subject, e.g. topic ``sensors.all``; the
      group's consumer filters on it, in the stream that captures the whole pattern: an
      existing one, or Herald's stream of the topic, created (or widened) to capture it, so
      core-NATS publishes to matching subjects are kept from the subscribe on. Widening first
      narrows the stream's other groups to the topic's subject. ``source`` is refused: the
      stream is found by subject.
    * group -> durable pull consumer on that stream, named like streams (``.`` -> ``~``) on
      Herald's own stream, ``<topic>:<group>`` on any other, filtered on the topic's subject
      (or the bind pattern) unless the stream captures only that subject;
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
      ``nats:<topic>:<stream sequence>`` (``nats:<stream>:<seq>`` on a stream that is not the
      topic's own); without ``Herald-Type`` the type is None; without ``Herald-Key`` the key
      is None, or the subject when it is not the topic's own (a bind pattern's); other headers
      become Herald headers as they are.

    A plain nats-py client publishes with ``await js.publish("orders", b'{"id": 1}')`` once the
    stream exists (Herald creates it on first publish or subscribe), or with core NATS
    (``await nc.publish("orders", ...)``: kept once a stream captures the subject; core NATS
    drops what no stream captures), and reads Herald messages
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
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from functools import partial
from typing import ClassVar, TypeVar

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
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
    check_topology,
    unsupported,
    validate_name,
)
from herald.transports.connecting import describe
from herald.transports.nats import listing, peek
from herald.transports.nats.connection import Events, PubAcks, open_client
from herald.transports.nats.options import NatsOptions, parse_url
from herald.transports.nats.subscription import TRANSIENT as _TRANSIENT
from herald.transports.nats.subscription import NatsSubscription
from herald.transports.nats.subscription import quiet as _quiet
from herald.transports.nats.topology import Topology
from herald.transports.nats.wire import (
    check_pattern,
    encode_headers,
    stream_name,
)

__all__ = ["NatsSubscription", "NatsTransport", "PayloadTooLarge"]

log = logging.getLogger("herald.transports.nats")

T = TypeVar("T")

HEADER_RESERVE = 16 * 1024  # bytes of max_payload kept for headers in features.max_payload
_DEFAULT_MAX_PAYLOAD = 1024 * 1024  # NATS default, until the server's INFO says otherwise
# err_codes of the JetStream API
_STREAM_NOT_FOUND = 10059
_CONSUMER_NOT_FOUND = 10014
_CONSUMER_EXISTS = 10013
_CONSUMER_NAME_EXISTS = 10148
_SUBJECTS_OVERLAP = 10065


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
        #: streams and consumers of topics and groups (on connect)
        self._topo: Topology | None = None
        self._subs: set[NatsSubscription] = set()
        self._pubacks = PubAcks()
        self._events = Events(self._safe_url, self._subs)

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

    async def connect(self) -> None:
        """Connect within ``connect_timeout`` (:mod:`herald.transports.nats.connection`); then
        reconnect forever on loss."""
        if self._nc is not None:
            return
        o = self._opts
        nc = await open_client(o, self._safe_url, self._events)
        self._nc = nc
        self._events.connected = True
        self._jsm = nc.jsm(timeout=o.timeout)
        self._topo = Topology(self._jsm, self._api, self._js_request, o, self._safe_url)
        self._server_max = int(nc.max_payload or _DEFAULT_MAX_PAYLOAD)
        self.features = self._features()
        try:
            await self._pubacks.open(nc)
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        for sub in list(self._subs):
            await sub.close()
        nc, self._nc = self._nc, None
        self._events.connected = False
        self._jsm = None
        self._topo = None
        self._pubacks.cancel_all()
        if nc is not None:
            with _quiet():
                await asyncio.wait_for(nc.close(), self._opts.timeout)

    def _require(self) -> Client:
        if self._nc is None:
            raise TransportError(f"{self._safe_url} is not connected: call connect() first")
        return self._nc

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
                        f"{type(e).__name__}: {describe(e)} (is JetStream enabled?)"
                    ) from None
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

    def _topology(self) -> Topology:
        self._require()
        topo = self._topo
        assert topo is not None
        return topo

    async def _js_request(self, subject: str, body: bytes) -> bytes:
        msg = await self._require().request(subject, body, timeout=self._opts.timeout)
        return bytes(msg.data)

    # --- publish ---------------------------------------------------------------------------

    async def publish(self, topic: str, messages: Sequence[Message]) -> None:
        """Send the batch at once and await every PubAck; resend what was not acknowledged
        (same ``Nats-Msg-Id``, so deduplicated) until ``retry_timeout``."""
        nc = self._require()
        subject = (await self._topology().home(topic)).subject
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
        pubacks = self._pubacks
        while True:
            futures: dict[str, tuple[int, asyncio.Future[str | None]]] = {}
            failure = ""
            try:
                for i in todo:
                    reply, fut = pubacks.expect()
                    futures[reply] = (i, fut)
                    payload, headers = frames[i]
                    await nc.publish(subject, payload, reply, headers)
                remaining = max(0.01, min(self._opts.timeout, deadline - loop.time()))
                await asyncio.wait([f for _, f in futures.values()], timeout=remaining)
            except _TRANSIENT as e:
                failure = f"{type(e).__name__}: {describe(e)}"
            finally:
                for reply in futures:
                    pubacks.forget(reply)
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
                self._topology().forget(topic)
                subject = (await self._topology().home(topic)).subject
            todo = sorted(again)

    # --- groups ----------------------------------------------------------------------------

    async def subscribe(
        self,
        topic: str,
        group: str,
        *,
        start: Start = "earliest",
        bind: Sequence[str] = (),
        source: str | None = None,
    ) -> Subscription:
        """Join ``group`` on ``topic`` (a durable pull consumer; see the module docstring).

        ``bind`` takes one NATS subject pattern (``sensors.*``, ``orders.>``) that matches the
        topic's own subject: the group's consumer filters on it, in the stream that captures
        it — an existing stream, or Herald's stream of the topic made (or widened) to capture
        it, so core-NATS publishes to matching subjects are kept from then on. ``source``
        raises ``ValueError``: the stream is found by subject."""
        nc = self._require()
        validate_name("topic", topic)
        validate_name("group", group)
        if start not in ("earliest", "latest"):
            raise ValueError(f"start must be 'earliest' or 'latest', not {start!r}")
        given, source = check_topology(bind, source)
        if source is not None:
            raise unsupported(
                "nats",
                "source",
                "the stream is found by subject: Herald uses the existing stream that captures "
                "the topic's subject (or the bind pattern), so name the topic after a subject "
                "of that stream",
            )
        if len(given) > 1:
            raise unsupported(
                "nats",
                "bind",
                f"a NATS 2.9 consumer filters on one subject, got {len(given)} patterns; give "
                "one (e.g. 'orders.>')",
            )
        pattern = check_pattern(given[0]) if given else None
        topo = self._topology()
        home = await topo.bound_home(topic, pattern) if pattern else await topo.home(topic)
        consumer = await topo.consumer(home, topic, group, start, pattern)
        sub = NatsSubscription(self, nc, topic, group, home, consumer)
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
        self._topology().forget(topic, streams=set(names))

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
