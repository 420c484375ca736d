"""Opening the Redis connection of :mod:`herald.transports.redis.transport`.

:func:`open_client` follows :mod:`herald.transports.connecting`: within ``connect_timeout``
seconds an unreachable server (refused, reset, no answer, still loading) is tried again, then
one :class:`~herald.transports.base.TransportError` names the URL, the budget and the cause.
What retrying cannot fix raises :class:`~herald.transports.base.PermanentTransportError` at
once (:func:`refused`): WRONGPASS and NOAUTH, NOPERM (Herald needs INFO to connect), any other
refusal of the connection check, a TLS mismatch, a server older than 6.2. Once connected,
NOPERM and refused credentials on any command are permanent too (the transport's ``_call``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import anyio
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import (
    AuthenticationError,
    NoPermissionError,
    RedisError,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from herald.transports.base import PermanentTransportError
from herald.transports.connecting import Endpoint, connect_within, load_tls
from herald.transports.redis.options import RedisOptions
from herald.transports.redis.wire import raw_reply

__all__ = ["new_client", "open_client", "refused"]

log = logging.getLogger("herald.transports.redis")

#: servers already warned about, in this process, for keeping nothing on disk
_WARNED: set[tuple[str, int]] = set()


def new_client(o: RedisOptions) -> aioredis.Redis:
    """A redis-py client for ``o`` (it connects on its first command)."""
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
        retry=Retry(NoBackoff(), 0),  # retries are ours (the transport's _call), bounded by time
        protocol=2,
        decode_responses=False,
        **kwargs,
    )
    # Raw replies: the hot path converts them itself.
    callbacks: Any = client  # typeshed-less: redis-py's callback protocol is loose
    callbacks.set_response_callback("XREADGROUP", raw_reply)
    return client


async def open_client(o: RedisOptions, url: str, scrub: Callable[[str], str]) -> aioredis.Redis:
    """A connected client whose server answered INFO; see the module docstring. ``url`` is
    the redacted URL, ``scrub`` removes the password from a text."""
    context = load_tls("Redis", url, o.ssl_context)
    endpoint = Endpoint(
        engine="Redis",
        url=url,
        hosts=[(o.host, o.port)],
        tls=context,
        other_mode="redis://" if o.tls else "rediss://",
        ca_option="ssl_ca_certs",
        scrub=scrub,
    )

    async def attempt(_seconds: float) -> aioredis.Redis:
        client = new_client(o)
        try:
            info = await client.info("server")
            version = str(info.get("redis_version", "0"))
            major_minor = tuple(int(x) for x in version.split(".")[:2] if x.isdigit())
            if major_minor < (6, 2):
                raise PermanentTransportError(
                    f"redis at {url} is version {version}; Herald needs 6.2 or later"
                )
            await _warn_if_volatile(client, o, url)
            return client
        except BaseException as e:
            with anyio.CancelScope(shield=True):
                await client.aclose()
            permanent = refused(url, e, "connect", scrub)
            if permanent is not None:
                raise permanent from None
            raise

    return await connect_within(
        endpoint,
        o.connect_timeout,
        attempt,
        transient=(RedisConnectionError, RedisTimeoutError),
        quiet=["redis"],
    )


def refused(
    url: str, e: BaseException, what: str, scrub: Callable[[str], str]
) -> PermanentTransportError | None:
    """The permanent error for a refusal retrying cannot fix (credentials, ACL; for
    ``what == "connect"`` any refused command), else ``None``."""
    text = scrub(str(e) or type(e).__name__)
    if isinstance(e, AuthenticationError):  # WRONGPASS, NOAUTH, invalid password
        code = getattr(e, "status_code", None) or "AUTH"
        hint = (
            "the server needs a password: add user:password@ to the URL"
            if code == "NOAUTH"
            else "wrong user name or password"
        )
        return PermanentTransportError(
            f"redis at {url} refused the credentials ({hint}): {code} {text}"
        )
    if isinstance(e, NoPermissionError):
        return PermanentTransportError(
            f"redis at {url}: the user may not {what} (NOPERM {text}); grant it the commands "
            "Herald uses (ACL SETUSER ... +@stream +@scripting +info, or see the transport's "
            "module docstring)"
        )
    if what == "connect" and isinstance(e, ResponseError):  # INFO refused: final
        return PermanentTransportError(f"redis at {url} refused the connection check: {text}")
    return None


async def _warn_if_volatile(client: aioredis.Redis, o: RedisOptions, url: str) -> None:
    try:
        config: dict[Any, Any] = dict(await client.config_get("appendonly"))
        config.update(await client.config_get("save"))
    except RedisError:
        return  # CONFIG may be disabled (managed Redis); nothing to say then
    appendonly = config.get(b"appendonly", config.get("appendonly"))
    save = config.get(b"save", config.get("save"))
    server = (o.host, o.port)
    if appendonly in (b"no", "no") and save in (b"", "") and server not in _WARNED:
        _WARNED.add(server)  # once per server and process
        log.warning(
            'redis at %s keeps nothing on disk (appendonly no, save ""): a restart of the '
            "server loses every message",
            url,
        )
