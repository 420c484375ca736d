"""The AMQP connection of :mod:`herald.transports.rabbitmq.transport`: one connection that
re-establishes itself, and the channels shared by every publish and declaration on it.

:meth:`Link.open` retries an unreachable broker with backoff for ``connect_timeout`` seconds
before raising :class:`~herald.transports.base.TransportError`; refused credentials fail at once.
Once open, a watcher task waits for the connection to drop and reconnects in the background
(0.1 s doubling to 5 s, logged). :attr:`Link.generation` grows with every new connection, so
holders of channels can tell that theirs belong to a lost one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from urllib.parse import unquote, urlsplit

import aiormq
import anyio

from herald.transports.base import TransportError
from herald.transports.rabbitmq.options import Options

__all__ = ["GONE", "Link"]

log = logging.getLogger("herald.transports.rabbitmq")

#: Errors that mean "the channel or connection is gone"; the link reconnects.
GONE = (
    aiormq.exceptions.AMQPConnectionError,
    aiormq.exceptions.ChannelInvalidStateError,
    aiormq.exceptions.ChannelClosed,
    ConnectionError,
    asyncio.IncompleteReadError,
    RuntimeError,  # aiormq raises it for writes on a closing transport
)


class Link:
    """One AMQP connection that re-establishes itself, and the shared channels on it."""

    def __init__(self, options: Options) -> None:
        self.options = options
        self.conn: aiormq.abc.AbstractConnection | None = None
        #: Grows with every (re)connection.
        self.generation = 0
        self.ready = asyncio.Event()
        self.closed = False
        self._pub: aiormq.abc.AbstractChannel | None = None
        self._topo: aiormq.abc.AbstractChannel | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._chan_lock = asyncio.Lock()

    def scrub(self, error: BaseException) -> str:
        """``error`` as text for logs and exceptions, with the URL's password removed."""
        text = f"{type(error).__name__}: {error}"
        password = urlsplit(self.options.client_url).password
        if password:
            text = text.replace(password, "***").replace(unquote(password), "***")
        return text

    async def open(self) -> None:
        """Connect (retrying for ``connect_timeout``) and start the reconnect watcher."""
        deadline = time.monotonic() + self.options.connect_timeout
        backoff = 0.1
        while True:
            try:
                await self._connect_once()
                break
            except aiormq.exceptions.ProbableAuthenticationError as e:
                raise TransportError(
                    f"RabbitMQ at {self.options.redacted} refused the credentials: {self.scrub(e)}"
                ) from None
            except (*GONE, OSError, TimeoutError) as e:
                if time.monotonic() + backoff > deadline:
                    raise TransportError(
                        f"cannot connect to RabbitMQ at {self.options.redacted} within "
                        f"{self.options.connect_timeout:g}s: {self.scrub(e)}"
                    ) from None
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
        self._watcher = asyncio.get_running_loop().create_task(self._watch())

    async def _connect_once(self) -> None:
        timeout = max(1.0, self.options.connect_timeout)
        conn = await asyncio.wait_for(aiormq.connect(self.options.client_url), timeout)
        self.conn = conn
        self._pub = None
        self._topo = None
        self.generation += 1
        self.ready.set()

    async def _watch(self) -> None:
        """Wait for the connection to drop; reconnect with backoff until closed."""
        while not self.closed:
            conn = self.conn
            assert conn is not None
            try:
                await conn.closing
            except BaseException as e:
                reason = self.scrub(e)
            else:
                reason = "closed by the broker"
            if self.closed:
                return
            self.ready.clear()
            log.warning("lost connection to %s (%s); reconnecting", self.options.redacted, reason)
            backoff = 0.1
            while not self.closed:
                await asyncio.sleep(backoff)
                try:
                    await self._connect_once()
                except (*GONE, OSError, TimeoutError) as e:
                    log.info(
                        "reconnect to %s failed (%s); retrying in %.1fs",
                        self.options.redacted,
                        self.scrub(e),
                        min(backoff * 2, 5.0),
                    )
                    backoff = min(backoff * 2, 5.0)
                else:
                    log.warning("reconnected to %s", self.options.redacted)
                    break

    async def wait_ready(self, timeout: float) -> aiormq.abc.AbstractConnection:
        """The live connection, waiting up to ``timeout`` seconds for a reconnect.

        Raises ``TimeoutError`` if it does not come back in time, :class:`TransportError`
        once the link is closed, and a :data:`GONE` error if it dropped just now."""
        if self.closed:
            raise TransportError(f"RabbitMQ transport {self.options.redacted} is closed")
        if not self.ready.is_set():
            with anyio.fail_after(timeout):
                await self.ready.wait()
        conn = self.conn
        if conn is None or conn.is_closed:
            self.ready.clear()
            raise aiormq.exceptions.ChannelInvalidStateError("connection is closed")
        return conn

    async def channel(
        self, timeout: float, *, confirms: bool = False
    ) -> aiormq.abc.AbstractChannel:
        """A new channel of its own (a subscription's), waiting for the connection as above."""
        conn = await self.wait_ready(timeout)
        return await conn.channel(publisher_confirms=confirms)

    async def pub(self, timeout: float) -> aiormq.abc.AbstractChannel:
        """The shared publish channel (publisher confirms on), opened when first needed."""
        ch = self._pub
        if ch is None or ch.is_closed:
            async with self._chan_lock:
                ch = self._pub
                if ch is None or ch.is_closed:
                    ch = self._pub = await self.channel(timeout, confirms=True)
        return ch

    async def topo(self, timeout: float) -> aiormq.abc.AbstractChannel:
        """The shared channel for declarations (a refused one closes it; the next call
        opens another)."""
        ch = self._topo
        if ch is None or ch.is_closed:
            async with self._chan_lock:
                ch = self._topo
                if ch is None or ch.is_closed:
                    ch = self._topo = await self.channel(timeout)
        return ch

    async def close(self) -> None:
        """Stop reconnecting and close the connection (bounded, shielded). Idempotent."""
        self.closed = True
        self.ready.clear()
        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None
        conn, self.conn = self.conn, None
        if conn is not None and not conn.is_closed:
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                try:
                    await conn.close()
                except (*GONE, OSError):
                    pass
