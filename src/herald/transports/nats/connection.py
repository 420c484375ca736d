"""Opening the NATS connection of :mod:`herald.transports.nats.transport`.

:func:`open_client` follows :mod:`herald.transports.connecting`: within ``connect_timeout``
seconds an unreachable server is tried again (nats-py's own attempts, 0.5 s apart) and a
server whose JetStream does not answer yet is asked again; then one
:class:`~herald.transports.base.TransportError` names the URL, the budget and the cause.
What retrying cannot fix raises :class:`~herald.transports.base.PermanentTransportError` at
once: the server refusing the credentials ("Authorization Violation"), a ``creds`` or ``nkey``
file that cannot be read or is not one, TLS files that do not load, a TLS mismatch, an account
without JetStream.

TLS is not the first thing on a NATS connection (the server sends its INFO in the clear, then
the client upgrades), so the check of :mod:`herald.transports.connecting` does not apply;
before nats-py sends any credentials, :func:`_probe_tls` reads the server's INFO and does the
TLS handshake on a short connection of its own: a server that offers no TLS to a ``tls://``
URL, a certificate the client does not trust or a refused client certificate fail at once.
(nats-py would retry those, and can hang after a failed upgrade: nats-io/nats.py#718.)
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import anyio
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg

from herald.transports.base import PermanentTransportError
from herald.transports.connecting import Endpoint, connect_within, describe, load_tls
from herald.transports.nats.options import NatsOptions
from herald.transports.nats.subscription import TRANSIENT, quiet

if TYPE_CHECKING:
    from herald.transports.nats.subscription import NatsSubscription

__all__ = ["Events", "PubAcks", "open_client"]

log = logging.getLogger("herald.transports.nats")

#: nats-py's wait between two attempts to reach the server (connecting and reconnecting).
_RECONNECT_WAIT = 0.5
#: nats-py's timeout of each step of one attempt (TCP, INFO, TLS, PONG), also on reconnects.
_STEP_TIMEOUT = 2.0
#: How long the cleanup of a failed attempt waits for nats-py's close.
_CLOSE_TIMEOUT = 0.5
#: err_code of the JetStream API: JetStream is not enabled for the account
_JETSTREAM_NOT_ENABLED = (10039, 10076)


def _tls_context(o: NatsOptions) -> ssl.SSLContext | None:
    if not (o.tls or o.tls_ca or o.tls_cert or o.tls_key):
        return None
    ctx = ssl.create_default_context(cafile=o.tls_ca)
    if o.tls_cert:
        ctx.load_cert_chain(o.tls_cert, o.tls_key)
    return ctx


def _check_files(o: NatsOptions, url: str) -> None:
    """A ``creds`` or ``nkey`` file must be readable and look like one: nats-py would only
    fail later, as an authorization violation or an odd error deep in a reconnect."""
    for option, path, marker in (
        ("creds", o.creds, "NATS USER JWT"),
        ("nkey", o.nkey, ""),
    ):
        if path is None:
            continue
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                text = f.read(65536)
        except OSError as e:
            raise PermanentTransportError(
                f"NATS at {url}: cannot read the {option} file: {describe(e)}"
            ) from None
        ok = marker in text and "NKEY SEED" in text if marker else "SU" in text
        if not ok:
            what = "a user JWT and an nkey seed" if marker else "an nkey seed (SU...)"
            raise PermanentTransportError(
                f"NATS at {url}: the {option} file {path!r} is not one: it holds no {what}"
            )


class Events:
    """nats-py's callbacks once connected (:attr:`connected`): a lost connection and a
    reconnect are logged, of the failed reconnect attempts only the first loudly, and the
    subscriptions are told (their open pull requests are gone)."""

    def __init__(self, url: str, subs: Iterable[NatsSubscription]) -> None:
        self._url = url
        self._subs = subs
        self._error_logged = False
        self.connected = False

    async def error(self, e: Exception) -> None:
        level = logging.DEBUG if self._error_logged else logging.WARNING
        self._error_logged = True
        log.log(level, "NATS %s: %s: %s", self._url, type(e).__name__, describe(e))

    async def disconnected(self) -> None:
        if self.connected:
            log.warning("NATS %s: connection lost; reconnecting", self._url)
        for sub in self._subs:
            sub._connection_lost()

    async def reconnected(self) -> None:
        self._error_logged = False
        log.warning("NATS %s: reconnected", self._url)
        for sub in self._subs:
            sub._connection_lost()


async def open_client(o: NatsOptions, url: str, events: Events) -> Client:
    """A connected nats-py client whose JetStream answers, reconnecting forever after a loss
    (with ``events`` as its callbacks). See the module docstring."""
    tls = load_tls("NATS", url, lambda: _tls_context(o))
    _check_files(o, url)
    endpoint = Endpoint(
        engine="NATS",
        url=url,
        hosts=[(o.host, o.port)],
        tls=None,  # checked by _probe_tls: NATS upgrades to TLS after the server's INFO
        other_mode="nats://" if tls else "tls://",
        ca_option="tls_ca",
        tls_first=False,
    )
    probed = False

    async def attempt(seconds: float) -> Client:
        nonlocal probed
        deadline = time.monotonic() + seconds
        if not probed:
            # half the time at most: a handshake that gets no answer is reported as such
            probed = await _probe_tls(o, url, tls, time.monotonic() + min(seconds / 2, 2.0))
        return await _attempt(o, url, tls, deadline, events)

    return await connect_within(
        endpoint,
        o.connect_timeout,
        attempt,
        transient=(*TRANSIENT, nats.errors.Error),
        quiet=["nats"],
    )


class _Attempt:
    """What nats-py reports through ``error_cb`` while one attempt runs."""

    def __init__(self) -> None:
        self.connected = False
        self.errors: list[str] = []
        self.refused: asyncio.Future[str] = asyncio.get_running_loop().create_future()


def _refuses_credentials(e: Exception) -> bool:
    text = str(e).lower()
    return (
        isinstance(e, nats.errors.AuthorizationError)
        or "authorization violation" in text
        or ("authentication" in text and ("expired" in text or "revoked" in text))
    )


async def _attempt(
    o: NatsOptions,
    url: str,
    tls: ssl.SSLContext | None,
    deadline: float,
    events: Events,
) -> Client:
    state = _Attempt()

    async def error_cb(e: Exception) -> None:
        if state.connected:
            await events.error(e)
            return
        reason = f"{type(e).__name__}: {describe(e)}"
        log.debug("NATS %s: connecting: %s", url, reason)
        if reason not in state.errors:
            state.errors.append(reason)
        if _refuses_credentials(e) and not state.refused.done():
            state.refused.set_result(reason)

    kwargs: dict[str, Any] = {
        # seconds; nats-py annotates these as int but takes any number
        "connect_timeout": min(_STEP_TIMEOUT, max(0.05, deadline - time.monotonic())),
        "reconnect_time_wait": _RECONNECT_WAIT,
    }
    if o.user is not None:
        kwargs.update(user=o.user, password=o.password)
    if o.token is not None:
        kwargs["token"] = o.token
    if o.creds:
        kwargs["user_credentials"] = o.creds
    if o.nkey:
        kwargs["nkeys_seed"] = o.nkey
    nc = Client()
    connecting = asyncio.ensure_future(
        nc.connect(
            servers=[f"{'tls' if tls else 'nats'}://{o.host}:{o.port}"],
            name=o.name,
            tls=tls,
            allow_reconnect=True,
            max_reconnect_attempts=-1,  # retried until the budget ends, and after a loss
            error_cb=error_cb,
            disconnected_cb=events.disconnected,
            reconnected_cb=events.reconnected,
            pending_size=64 * 1024 * 1024,  # buffered while reconnecting
            **kwargs,
        )
    )
    try:
        # nats-py keeps trying an unreachable server: our deadline ends the attempt, with the
        # reasons it reported (the budget ends just after it)
        left = deadline - time.monotonic() - 0.05
        waits: list[asyncio.Future[Any]] = [connecting, state.refused]
        await asyncio.wait(waits, timeout=max(0.0, left), return_when="FIRST_COMPLETED")
        if state.refused.done():
            raise PermanentTransportError(
                f"NATS at {url} refused the credentials ({state.refused.result()}): check the "
                "user and password, token, creds or nkey"
            )
        if not connecting.done():
            raise ConnectionError("; ".join(state.errors[-2:]) or "no answer")
        connecting.result()
        state.connected = True
        await _check_jetstream(nc, o, url, deadline)
        return nc
    except BaseException:
        connecting.cancel()
        with anyio.CancelScope(shield=True), quiet():
            # after a failed TLS upgrade nats-py's close can hang: do not wait long
            await asyncio.wait_for(nc.close(), _CLOSE_TIMEOUT)
        raise


async def _check_jetstream(nc: Client, o: NatsOptions, url: str, deadline: float) -> None:
    """JetStream must answer: not enabled for the account is permanent, no answer (yet) is
    tried again within the budget."""
    left = max(0.05, deadline - time.monotonic())
    try:
        await nc.jsm(timeout=min(o.timeout, left)).account_info()
    except nats.js.errors.APIError as e:
        if e.err_code in _JETSTREAM_NOT_ENABLED:
            raise PermanentTransportError(
                f"NATS at {url}: JetStream is not enabled for this account ({e.description}); "
                "Herald needs it (nats-server -js, or jetstream in the account's config)"
            ) from None
        raise ConnectionError(f"JetStream refused the account check: {e}") from None
    except TRANSIENT as e:
        raise ConnectionError(
            f"JetStream does not answer ({type(e).__name__}: {describe(e)}): is it enabled on "
            "the server (nats-server -js)?"
        ) from None


async def _probe_tls(o: NatsOptions, url: str, tls: ssl.SSLContext | None, deadline: float) -> bool:
    """Check TLS before nats-py sends credentials, on a short connection of our own; ``True``
    once the server's INFO was read (the check is done), ``False`` if it could not be reached.

    nats-py upgrades to TLS only when the server requires it, so against a server without TLS
    a ``tls://`` URL would send credentials in the clear: read the server's INFO line and
    refuse. When TLS is on (asked for, or required by the server, which nats-py then honours
    with the system CAs), do the handshake: a certificate the client does not trust, or a
    client certificate the server refuses, is a clear error at once.
    """

    def left() -> float:
        return max(0.001, deadline - time.monotonic())

    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(o.host, o.port), left())
    except (OSError, TimeoutError):
        return False  # unreachable: the attempt reports it
    try:
        line = await asyncio.wait_for(reader.readline(), left())
        info = json.loads(line.partition(b" ")[2] or b"{}")
        if not isinstance(info, dict):
            return True
        offered = bool(info.get("tls_required") or info.get("tls_available"))
        if tls is not None and not offered:
            raise PermanentTransportError(
                f"NATS at {url}: TLS requested but the server does not offer TLS; not sending "
                "credentials in the clear (use nats:// for a plain connection)"
            )
        if tls is None and not info.get("tls_required"):
            return True  # plain connection
        context = tls if tls is not None else ssl.create_default_context()
        try:
            await asyncio.wait_for(writer.start_tls(context, server_hostname=o.host), left())
        except TimeoutError:
            raise TimeoutError(
                f"TLS handshake with {o.host}:{o.port} got no answer (is it a TLS port?)"
            ) from None
        return True
    except ssl.SSLError as e:  # before OSError: SSLError is one
        hint = (
            "; the client does not trust the server's certificate: give its CA with tls_ca"
            if isinstance(e, ssl.SSLCertVerificationError)
            else ""
        )
        raise PermanentTransportError(
            f"NATS at {url}: TLS handshake failed: {type(e).__name__}: {describe(e)}{hint}"
        ) from None
    except TimeoutError as e:  # before OSError: TimeoutError is one
        if "TLS" in str(e):
            raise
        return True  # no INFO in time: nats-py's attempt reports it
    except (OSError, ValueError):
        return True  # odd: nats-py's attempt reports it
    finally:
        # not wait_closed(): after a failed start_tls it may never complete
        writer.close()


class PubAcks:
    """The connection's PubAck inbox: one wildcard subscription ``<inbox>.*``. Each published
    message gets a reply subject and a future its PubAck resolves: ``None`` once stored, else
    the refusal (``"status 503"``: no stream or JetStream not ready; ``"error <code>: ..."``)."""

    def __init__(self) -> None:
        self._prefix = ""
        self._waiters: dict[str, asyncio.Future[str | None]] = {}
        self._next = 0

    async def open(self, nc: Client) -> None:
        self._prefix = nc.new_inbox() + "."
        await nc.subscribe(self._prefix + "*", cb=self._on_reply, pending_msgs_limit=-1)

    def expect(self) -> tuple[str, asyncio.Future[str | None]]:
        """A fresh reply subject and the future its PubAck resolves."""
        self._next += 1
        token = str(self._next)
        fut: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self._waiters[token] = fut
        return self._prefix + token, fut

    def forget(self, reply: str) -> None:
        self._waiters.pop(reply[len(self._prefix) :], None)

    def cancel_all(self) -> None:
        for fut in self._waiters.values():
            if not fut.done():
                fut.cancel()
        self._waiters.clear()

    async def _on_reply(self, msg: Msg) -> None:
        fut = self._waiters.pop(msg.subject[len(self._prefix) :], None)
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
