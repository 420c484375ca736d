"""The AMQP connection of :mod:`herald.transports.rabbitmq.transport`: one connection that
re-establishes itself, and the channels shared by every publish and declaration on it.

:meth:`Link.open` follows :mod:`herald.transports.connecting`: an unreachable broker is retried
for ``connect_timeout`` seconds before :class:`~herald.transports.base.TransportError`;
refused credentials, a virtual host that is missing or closed to the user, and a TLS mismatch
raise :class:`~herald.transports.base.PermanentTransportError` at once.
Once open, a watcher task waits for the connection to drop and reconnects in the background
(0.1 s doubling to 5 s, logged). :attr:`Link.generation` grows with every new connection, so
holders of channels can tell that theirs belong to a lost one.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from urllib.parse import unquote, urlsplit

import aiormq
import anyio

from herald.transports.base import PermanentTransportError, TransportError
from herald.transports.connecting import Endpoint, connect_within, load_tls
from herald.transports.rabbitmq.options import Options

__all__ = ["GONE", "Link", "refused"]

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


def refused(
    options: Options, error: aiormq.exceptions.ChannelAccessRefused, what: str
) -> PermanentTransportError:
    """The permanent error for a channel the broker closed because the user lacks a
    permission (ACCESS_REFUSED: configure, write or read on the object). Retrying such an
    operation only repeats the refusal."""
    user = unquote(urlsplit(options.client_url).username or "guest")
    return PermanentTransportError(
        f"RabbitMQ at {options.redacted}: user {user!r} may not {what}: {error} (grant it "
        "configure, write and read permissions on the vhost: rabbitmqctl set_permissions)"
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
        self._context: ssl.SSLContext | None = None

    def scrub(self, error: BaseException) -> str:
        """``error`` as text for logs and exceptions, with the URL's password removed."""
        return self._scrub_text(f"{type(error).__name__}: {error}")

    def _scrub_text(self, text: str) -> str:
        password = urlsplit(self.options.client_url).password
        if password:
            text = text.replace(password, "***").replace(unquote(password), "***")
        return text

    async def open(self) -> None:
        """Connect within ``connect_timeout`` (:mod:`herald.transports.connecting`) and start
        the reconnect watcher."""
        o = self.options
        self._context = load_tls("RabbitMQ", o.redacted, o.ssl_context)
        endpoint = Endpoint(
            engine="RabbitMQ",
            url=o.redacted,
            hosts=[o.address],
            tls=self._context,
            other_mode="amqps://" if self._context is None else "amqp://",
            ca_option="cafile",
            scrub=self._scrub_text,
        )
        await connect_within(
            endpoint,
            o.connect_timeout,
            self._first_connect,
            transient=(*GONE, aiormq.exceptions.ProtocolSyntaxError),
            quiet=["aiormq", "aio_pika"],
        )
        self._watcher = asyncio.get_running_loop().create_task(self._watch())

    async def _first_connect(self, timeout: float) -> None:
        """One attempt of :meth:`open`; what retrying cannot fix is permanent."""
        o = self.options
        try:
            await self._connect_once(timeout)
        except aiormq.exceptions.ProbableAuthenticationError as e:  # 403 ACCESS_REFUSED
            raise PermanentTransportError(
                f"RabbitMQ at {o.redacted} refused the login (wrong user name or password?): "
                f"{self.scrub(e)}"
            ) from None
        except aiormq.exceptions.AuthenticationError as e:  # no common SASL mechanism
            raise PermanentTransportError(
                f"RabbitMQ at {o.redacted} offers no login mechanism the client has: {e}"
            ) from None
        except (aiormq.exceptions.ConnectionNotAllowed, aiormq.exceptions.InvalidFrameError) as e:
            # aiormq reports the broker's Connection.Close in answer to Connection.Open (the
            # vhost) as "expected OpenOk, got Close", without the broker's text
            if isinstance(e, aiormq.exceptions.InvalidFrameError) and not (
                "OpenOk" in str(e) and "Connection.Close" in str(e)
            ):
                raise
            parts = urlsplit(o.client_url)
            vhost = unquote(parts.path[1:]) or "/"
            user = unquote(parts.username or "guest")
            raise PermanentTransportError(
                f"RabbitMQ at {o.redacted} refused to open virtual host {vhost!r}: it does not "
                f"exist, or user {user!r} has no permissions on it (rabbitmqctl list_vhosts; "
                f"rabbitmqctl list_permissions -p {vhost})"
            ) from None

    async def _connect_once(self, timeout: float) -> None:
        conn = await asyncio.wait_for(
            aiormq.connect(self.options.client_url, context=self._context), timeout
        )
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
                    await self._connect_once(max(1.0, self.options.connect_timeout))
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
