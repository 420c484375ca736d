"""Reaching an engine: the rules every networked transport's ``connect()`` follows.

* **One budget.** ``connect()`` has ``connect_timeout`` seconds (a URL option of every
  networked transport, default :data:`CONNECT_TIMEOUT`) to get a working connection.
  Transient failures (connection refused or reset, no answer, a broker that is starting or
  busy) are retried within it, with backoff from 0.1 s doubling to 1 s; each attempt gets
  what is left of the budget. When the budget is spent, one
  :class:`~herald.transports.base.TransportError`:
  ``cannot connect to <Engine> at <url> within <n>s (connect_timeout): <cause>``.
* **Permanent failures fail at once**: wrong credentials, a missing permission or virtual host,
  a TLS mismatch raise :class:`~herald.transports.base.PermanentTransportError` on the first
  attempt that sees them. The transport's attempt decides which of its library's errors are
  permanent; a TLS error (:class:`ssl.SSLError`) always is.
* **TLS is checked by Herald**, so a mismatch says "TLS" on every engine. For a TLS URL, the
  first attempt that reaches the port does a TLS handshake with the transport's own context
  before the client library runs (and before any credentials are sent): an untrusted
  certificate, a plain port or a server that closes the connection fail at once. For a plain
  URL, the first failed attempt checks whether the port speaks TLS, and if it does says to
  use the TLS scheme instead of retrying.
* **The client library stays quiet.** While ``connect()`` runs, the records the library logs
  about failed attempts (aiokafka, aiormq, nats, paho/aiomqtt, redis) are demoted to DEBUG
  (dropped unless DEBUG is enabled for that logger); the error carries the cause. Background
  tasks the library starts during ``connect()`` log normally once it returned.

Every message is one line (newlines folded) with the redacted URL; causes pass through the
transport's ``scrub`` so a password never shows.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TypeVar

import anyio

from herald.transports.base import PermanentTransportError, TransportError

__all__ = [
    "CONNECT_TIMEOUT",
    "Endpoint",
    "connect_within",
    "describe",
    "library_said",
    "load_tls",
]

T = TypeVar("T")
C = TypeVar("C", ssl.SSLContext, ssl.SSLContext | None)

#: Default ``connect_timeout`` of every networked transport, in seconds: long enough for a
#: broker that is still starting (a compose file starting app and broker together), short
#: enough that a wrong port or host is reported while the user still looks.
CONNECT_TIMEOUT = 10.0

_FIRST_BACKOFF = 0.1
_MAX_BACKOFF = 1.0
#: No new attempt starts with less than this left of the budget.
_LAST_TRY = 0.2
#: The most one "does this port speak TLS?" check of a plain URL may take.
_PLAIN_PROBE = 1.0
_MAX_CAUSE = 400


def _no_scrub(text: str) -> str:
    return text


@dataclass(frozen=True)
class Endpoint:
    """Where a transport connects, for the messages and the TLS checks of :func:`connect_within`."""

    #: The engine's name in messages: ``"Redis"``, ``"RabbitMQ"``...
    engine: str
    #: The URL with the password redacted.
    url: str
    #: The servers a connection may go to (Kafka: the bootstrap servers; others: one).
    hosts: Sequence[tuple[str, int]]
    #: The TLS context the client library uses; ``None`` for a plain connection.
    tls: ssl.SSLContext | None
    #: How to ask for the other mode, for the hint of a mismatch: ``"rediss://"`` for a plain
    #: URL, ``"redis://"`` for a TLS one.
    other_mode: str
    #: The URL option that names a CA file, for the hint of an untrusted certificate.
    ca_option: str | None = None
    #: Removes secrets from a library's error text.
    scrub: Callable[[str], str] = field(default=_no_scrub)
    #: The protocol starts with the TLS handshake, so the checks above apply; ``False`` for
    #: NATS, which upgrades after the server's greeting and checks TLS itself.
    tls_first: bool = True

    def where(self, host: str, port: int) -> str:
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def describe(error: BaseException) -> str:
    """``error`` as one short line: its text, or its type when it has none."""
    if isinstance(error, TimeoutError) and not str(error):
        return "timed out"
    text = str(error) or type(error).__name__
    text = " ".join(text.split())
    return text if len(text) <= _MAX_CAUSE else text[: _MAX_CAUSE - 3] + "..."


def load_tls(engine: str, url: str, make: Callable[[], C]) -> C:
    """``make()``, the transport's TLS context (``None`` for a plain URL); a CA, certificate or
    key file that does not load is a :class:`PermanentTransportError` naming the URL."""
    try:
        return make()
    except (OSError, ssl.SSLError) as e:
        raise PermanentTransportError(
            f"{engine} at {url}: cannot load the TLS files: {describe(e)}"
        ) from None


async def connect_within(
    endpoint: Endpoint,
    budget: float,
    attempt: Callable[[float], Awaitable[T]],
    *,
    transient: tuple[type[BaseException], ...] = (),
    quiet: Sequence[str] = (),
) -> T:
    """Run ``attempt(seconds_left)`` until it returns, within ``budget`` seconds.

    ``attempt`` makes one connection attempt within the seconds it is given (it is also
    cancelled when they run out) and cleans up after itself when it fails. It raises
    :class:`PermanentTransportError` for what retrying cannot fix; an :class:`OSError`,
    :class:`TimeoutError`, :class:`EOFError` or one of ``transient`` means "try again" (an
    :class:`ssl.SSLError` is a permanent TLS failure). Other exceptions propagate at once.
    ``quiet`` names the loggers (with their children) of the client library to demote.
    """
    deadline = time.monotonic() + budget
    delay = _FIRST_BACKOFF
    cause = "timed out"
    tls_checked = not endpoint.tls_first
    plain_checked = endpoint.tls is not None or not endpoint.tls_first
    retry_on: tuple[type[BaseException], ...] = (OSError, TimeoutError, EOFError, *transient)
    with _quieted(quiet) as scope:
        while True:
            scope.last = scope.error = None  # what the library logs about this attempt
            try:
                if endpoint.tls is not None and not tls_checked:
                    await _check_tls(endpoint, endpoint.tls, deadline)
                    tls_checked = True
                left = max(0.001, deadline - time.monotonic())
                with anyio.fail_after(left):
                    return await attempt(left)
            except PermanentTransportError:
                raise
            except ssl.SSLError as e:  # the library's own handshake (a subclass of OSError)
                raise _tls_failure(endpoint, endpoint.hosts[0], e) from None
            except retry_on as e:
                cause = endpoint.scrub(describe(e))
                if not plain_checked:
                    left = deadline - time.monotonic()
                    plain_checked, tls_port = await _speaks_tls(endpoint, min(_PLAIN_PROBE, left))
                    if tls_port is not None:
                        raise PermanentTransportError(
                            f"{endpoint.engine} at {endpoint.url}: {tls_port} speaks TLS, this "
                            f"URL asks for a plain connection ({cause}); use {endpoint.other_mode}"
                        ) from None
            left = deadline - time.monotonic()
            if left < _LAST_TRY:
                raise TransportError(
                    f"cannot connect to {endpoint.engine} at {endpoint.url} within {budget:g}s "
                    f"(connect_timeout): {cause}"
                )
            await anyio.sleep(min(delay, left - _LAST_TRY))  # the last try just before the end
            delay = min(delay * 2, _MAX_BACKOFF)


# --- TLS ------------------------------------------------------------------------------------


async def _check_tls(endpoint: Endpoint, context: ssl.SSLContext, deadline: float) -> None:
    """A TLS handshake with the first host that accepts a TCP connection, with the transport's
    own context, before ``deadline`` (``time.monotonic()``). Unreachable hosts raise their
    :class:`OSError` (transient); a handshake that fails raises
    :class:`PermanentTransportError`; one that gets no answer, a ``TimeoutError`` saying TLS."""
    error: OSError | TimeoutError = TimeoutError()
    for host, port in endpoint.hosts:
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_connection(host, port), max(0.001, deadline - time.monotonic())
            )
        except (OSError, TimeoutError) as e:
            error = e
            continue
        try:
            await asyncio.wait_for(
                writer.start_tls(context, server_hostname=host),
                max(0.001, deadline - time.monotonic()),
            )
        except TimeoutError:
            raise TimeoutError(
                f"TLS handshake with {endpoint.where(host, port)} got no answer (is it a TLS "
                f"port? use {endpoint.other_mode} for a plain one)"
            ) from None
        except (OSError, EOFError) as e:  # ssl.SSLError, or the server closing the connection
            raise _tls_failure(endpoint, (host, port), e) from None
        finally:
            writer.close()  # not wait_closed(): after a failed handshake it may never complete
        return
    raise error


def _tls_failure(
    endpoint: Endpoint, address: tuple[str, int], error: BaseException
) -> PermanentTransportError:
    text = endpoint.scrub(describe(error))
    if isinstance(error, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in text:
        hint = "the client does not trust the server's certificate" + (
            f": give its CA with {endpoint.ca_option}" if endpoint.ca_option else ""
        )
    elif isinstance(error, ssl.SSLError) and "alert" in text.lower():
        hint = "the server refused the client's TLS settings (client certificate, version)"
    else:  # wrong version number, record layer failure, connection closed or reset
        hint = f"the port does not seem to speak TLS: use {endpoint.other_mode} for a plain one"
    return PermanentTransportError(
        f"{endpoint.engine} at {endpoint.url}: TLS handshake with "
        f"{endpoint.where(*address)} failed: {text}; {hint}"
    )


async def _speaks_tls(endpoint: Endpoint, timeout: float) -> tuple[bool, str | None]:
    """Whether some host accepted a TCP connection (else the check is still to do), and the
    first that completes a TLS handshake (certificate not checked) as ``host:port``, or
    ``None`` when none does within ``timeout``."""
    reached = False
    if timeout <= 0:
        return reached, None
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    for host, port in endpoint.hosts:
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
        except (OSError, TimeoutError):
            continue
        reached = True
        try:
            await asyncio.wait_for(writer.start_tls(context, server_hostname=host), timeout)
        except (OSError, EOFError, TimeoutError):
            continue
        finally:
            writer.close()
        return reached, endpoint.where(host, port)
    return reached, None


# --- quieting the client library ------------------------------------------------------------


class _Scope:
    """One ``connect()`` in progress; tasks started under it share this object."""

    __slots__ = ("active", "error", "last")

    def __init__(self) -> None:
        self.active = True
        self.last: str | None = None
        self.error: BaseException | None = None


_SCOPE: ContextVar[_Scope | None] = ContextVar("herald_connecting", default=None)


class _Demote(logging.Filter):
    """Demotes a library's records to DEBUG while a ``connect()`` runs in this context."""

    def filter(self, record: logging.LogRecord) -> bool:
        scope = _SCOPE.get()
        if scope is None or not scope.active or record.levelno <= logging.DEBUG:
            return True
        if record.levelno >= logging.WARNING:
            scope.last = record.getMessage()
            args = record.args if isinstance(record.args, tuple) else ()
            scope.error = next((a for a in args if isinstance(a, BaseException)), scope.error)
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        # handlers check only the record's level: drop it unless DEBUG is wanted here
        return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)


_DEMOTE = _Demote()


@contextlib.contextmanager
def _quieted(prefixes: Sequence[str]) -> Iterator[_Scope]:
    for name in [*prefixes, *list(logging.Logger.manager.loggerDict)]:
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            logger = logging.getLogger(name)
            if _DEMOTE not in logger.filters:
                logger.addFilter(_DEMOTE)
    scope = _Scope()
    token = _SCOPE.set(scope)
    try:
        yield scope
    finally:
        scope.active = False
        _SCOPE.reset(token)


def library_said() -> tuple[str | None, BaseException | None]:
    """The last warning or error the client library logged (demoted) during this
    ``connect()``, and the last exception such a record carried: aiokafka, for one, logs the
    cause of a failed attempt (a refused SASL login, a TLS error) and raises a vague error."""
    scope = _SCOPE.get()
    return (scope.last, scope.error) if scope is not None else (None, None)
