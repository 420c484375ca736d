"""One member of a group on NATS JetStream: pull requests, buffering, ack/nak, close.

Part of :mod:`herald.transports.nats.transport` (whose docstring describes the mapping); split out
to keep one concept per file. The transport creates :class:`NatsSubscription` objects."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections import deque
from collections.abc import Sequence
from typing import Protocol

import anyio
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription as NatsSub

from herald.transports.base import Delivery, Subscription, TransportError
from herald.transports.nats.options import NatsOptions
from herald.transports.nats.topology import Home
from herald.transports.nats.wire import decode_message, delivery_info

__all__ = ["TRANSIENT", "NatsSubscription", "Owner", "quiet"]

log = logging.getLogger("herald.transports.nats")

_REQUEST_GRACE = 1.0  # how long past its expiry a pull request may still answer
_NO_WAIT_ANSWER = 1.0  # how long to wait for the answer to a no_wait pull request
_LINGER = 0.2  # longest a waiting pull request stays open (see NatsSubscription.fetch)

# errors that mean "the server cannot answer right now": retried until retry_timeout
TRANSIENT = (
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    nats.errors.ConnectionClosedError,
    nats.errors.OutboundBufferLimitError,
    nats.errors.ConnectionReconnectingError,
    nats.js.errors.ServiceUnavailableError,
    asyncio.TimeoutError,
    ConnectionError,
)


def _seconds_ns(seconds: float) -> int:
    return max(1, int(seconds * 1_000_000_000))


class Owner(Protocol):
    """What a subscription uses of the transport that made it. The transport module imports
    this one, so this one names these members instead of importing the transport class."""

    @property
    def url(self) -> str: ...

    @property
    def _opts(self) -> NatsOptions: ...

    @property
    def _subs(self) -> set[NatsSubscription]:
        """The transport's open subscriptions; a closing one removes itself."""
        ...

    async def _confirm(self, subjects: Sequence[str], body: bytes, what: str) -> None:
        """Send ``body`` to each ack subject and wait until the server processed them all."""
        ...


class NatsSubscription(Subscription):
    """One member of a group: a durable pull consumer read through this subscription's inbox."""

    def __init__(
        self,
        transport: Owner,
        nc: Client,
        topic: str,
        group: str,
        home: Home,
        consumer: str,
    ) -> None:
        self.topic = topic
        self.group = group
        self._t = transport
        self._nc = nc
        self._next = f"$JS.API.CONSUMER.MSG.NEXT.{home.stream}.{consumer}"
        # plain messages: ids name the stream when it is not the topic's own; the key is the
        # subject when it is not the topic's own
        self._id_stream = None if home.own else home.stream
        self._subject = home.subject
        self._inbox = nc.new_inbox()
        self._sub: NatsSub | None = None
        #: delivered by the server, not handed out yet
        self._buffer: deque[Msg] = deque()
        #: handed out, not acked or nacked yet: ack subject -> delivery
        self._held: dict[str, Delivery] = {}
        self._wake = asyncio.Event()
        # the one pull request that may be open: its number, deliveries left, local expiry
        self._req = 0
        self._req_open = False
        self._req_lingering = False
        self._req_left = 0
        self._req_until = 0.0
        self._gone: str | None = None
        self._closed = False

    async def _open(self) -> None:
        self._sub = await self._nc.subscribe(
            self._inbox + ".*", cb=self._on_msg, pending_msgs_limit=-1, pending_bytes_limit=-1
        )

    def _connection_lost(self) -> None:
        # the server forgets open pull requests with the connection
        self._req_open = False
        self._wake.set()

    async def _on_msg(self, msg: Msg) -> None:
        if msg.reply:  # a message (its reply subject is the ack subject)
            self._buffer.append(msg)
            self._req_left -= 1
            if self._req_left <= 0:
                self._req_open = False
            self._wake.set()
            return
        headers = msg.headers or {}
        status = headers.get("Status")
        if status == "100":  # idle heartbeat
            return
        if msg.subject == f"{self._inbox}.{self._req}":
            self._req_open = False  # 404 no messages, 408 expired, 409 and 503 end it too
            if status == "409" and "deleted" in str(headers.get("Description", "")).lower():
                self._gone = f"group {self.group!r} on {self.topic!r} was deleted"
            self._wake.set()

    def _check_open(self) -> None:
        if self._closed:
            raise TransportError(
                f"subscription {self.group!r} on {self.topic!r} ({self._t.url}) is closed"
            )

    async def _request(self, batch: int, expires: float | None) -> None:
        self._req += 1
        self._req_open = True
        self._req_lingering = expires is not None
        self._req_left = batch
        loop_time = asyncio.get_running_loop().time()
        if expires is None:
            body = b'{"batch":%d,"no_wait":true}' % batch
            self._req_until = loop_time + _NO_WAIT_ANSWER
        else:
            body = b'{"batch":%d,"expires":%d}' % (batch, _seconds_ns(expires))
            self._req_until = loop_time + expires + _REQUEST_GRACE
        try:
            await self._nc.publish(self._next, body, f"{self._inbox}.{self._req}")
        except TRANSIENT:
            self._req_open = False  # not connected: fetch waits and returns [] in time

    async def fetch(self, max_messages: int, timeout: float) -> list[Delivery]:
        """Buffered deliveries first; else a ``no_wait`` pull request for ``max_messages``
        (answered at once with what is there); if nothing was there, short lingering requests
        for one message until ``timeout``.

        A request is only left open by a cancelled fetch, and then for at most
        ``_LINGER`` seconds: an open request hands messages to this subscription, and one
        handed to an inbox that goes away would wait ``ack_wait`` to come back.
        """
        if max_messages < 1:
            raise ValueError(f"max_messages must be >= 1, not {max_messages!r}")
        self._check_open()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, timeout)
        asked = False
        while True:
            if self._closed:
                return []
            if self._gone is not None:
                raise TransportError(f"NATS {self._t.url}: {self._gone}")
            buffered = len(self._buffer)
            open_ = self._req_open
            if buffered and (not open_ or self._req_lingering or buffered >= max_messages):
                return self._take(max_messages)
            now = loop.time()
            if open_ and now >= self._req_until:
                self._req_open = False  # its answer was lost with the connection
                continue
            if not open_:
                if not asked:
                    asked = True
                    await self._request(max_messages, None)
                    continue
                remaining = deadline - now
                if remaining < 0.005:
                    return []
                await self._request(1, min(remaining, _LINGER))
                continue
            wait = self._req_until - now
            if self._req_lingering:
                if now >= deadline:
                    return []
                wait = min(wait, deadline - now)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait)

    def _take(self, n: int) -> list[Delivery]:
        buffer, held, topic = self._buffer, self._held, self.topic
        out: list[Delivery] = []
        for _ in range(min(n, len(buffer))):
            msg = buffer.popleft()
            reply = msg.reply
            attempt, seq = delivery_info(reply)
            subject = msg.subject if msg.subject != self._subject else None
            message = decode_message(
                topic, msg.data, msg.headers, seq, stream=self._id_stream, subject=subject
            )
            d = Delivery(message, attempt, reply)
            held[reply] = d
            out.append(d)
        return out

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        """Ack the deliveries; durable (confirmed by the server) when this returns."""
        self._check_open()
        held = self._held
        subjects = [d.token for d in deliveries if held.pop(d.token, None) is not None]
        if subjects:
            await self._t._confirm(subjects, b"+ACK", "ack")

    async def nack(self, delivery: Delivery, delay: float = 0.0) -> None:
        """Nak: JetStream redelivers after ``delay`` (kept by the server) with attempt + 1."""
        self._check_open()
        if not (delay >= 0 and math.isfinite(delay)):
            raise ValueError(f"nack delay must be a finite number >= 0, not {delay!r}")
        if self._held.pop(delivery.token, None) is None:
            return  # already acked or nacked
        body = b"-NAK" if delay <= 0 else b'-NAK {"delay":%d}' % _seconds_ns(delay)
        await self._t._confirm([delivery.token], body, "nack")

    async def close(self) -> None:
        """Stop the inbox (draining what is in flight), then nak everything not acked."""
        if self._closed:
            return
        self._closed = True
        self._t._subs.discard(self)
        self._wake.set()  # a waiting fetch returns []
        sub, self._sub = self._sub, None
        nc = self._nc
        loop = asyncio.get_running_loop()
        # shielded: a close that stops half-way would strand deliveries until ack_wait
        with anyio.CancelScope(shield=True):
            # an open pull request would hand messages to the inbox while it goes away;
            # it ends within _LINGER (left open only by a cancelled fetch)
            while self._req_open and nc.is_connected and loop.time() < self._req_until:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self._req_until - loop.time())
            if sub is not None and not nc.is_closed:
                with quiet():
                    # UNSUB ends our open pull request on the server; the flush in drain
                    # brings in what it had sent before, so nothing is left in flight
                    await asyncio.wait_for(sub.drain(), self._t._opts.timeout)  # type: ignore[no-untyped-call]
            back = [d.token for d in self._held.values()]
            back += [m.reply for m in self._buffer]
            self._held.clear()
            self._buffer.clear()
            if back and not nc.is_closed:
                try:
                    await self._t._confirm(back, b"-NAK", "release")
                except TransportError as e:
                    log.warning(
                        "NATS: %d deliveries of group %r will come back after ack_wait: %s",
                        len(back), self.group, e,
                    )  # fmt: skip


class quiet:
    """Swallow errors of best-effort cleanup (timeouts, a closed connection)."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> bool:
        return kind is not None and issubclass(kind, Exception)
