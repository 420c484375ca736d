"""The Kafka transport over a real TLS listener, and SASL failures that must not leak passwords.

Each test starts a PRIVATE Tansu (memory storage) on free loopback ports and stops it by its
own pid. Tansu 0.6 cannot serve TLS itself: its ``--cert`` and ``--key`` flags share a clap
group, so passing both is refused ("the argument '--cert' cannot be used with '--key'") and
either one alone leaves a plaintext listener. The TLS listener is therefore a small TLS
terminator (a Python subprocess, throw-away self-signed certificate made with ``openssl``)
that forwards each connection to the private Tansu, which advertises the terminator's port,
so every connection a client makes (bootstrap, group coordinator, fetches) goes through TLS.

Tansu does have SASL (``--authentication``, SCRAM-SHA-256/512 only, no PLAIN), but users can
only be created through the broker and an authenticating broker with memory storage refuses
the unauthenticated ``tansu user create``: there is no known password, so "wrong password" is
tested as credentials the broker does not know.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Iterator
from pathlib import Path

import pytest

from herald.testing.helpers import connected, drain, make_messages, subscribed, unique_name
from herald.transports import PermanentTransportError, open_transport

from .conftest import connect_fails
from .private_servers import TlsTansu
from .private_servers import tls_tansu as start_tls_tansu

pytestmark = pytest.mark.anyio

#: Tansu holds a group join for half a session: short sessions keep subscribe fast
GROUP_OPTIONS = "session_timeout_ms=2000&heartbeat_interval_ms=300"
SECRET = "tls-secret-pw-4821"
#: a refused connection must give up well within this (connect_timeout=2 plus slack)
BOUND = 15.0


@pytest.fixture
def tls_tansu(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[TlsTansu]:
    """A private Tansu behind a private TLS terminator; ``indirect`` param ``True`` starts
    Tansu with ``--authentication`` (SASL required)."""
    with start_tls_tansu(tmp_path, authentication=bool(getattr(request, "param", False))) as t:
        yield t


def _text(error: BaseException) -> str:
    """Everything a user could see of ``error``: message, repr and the printed traceback."""
    return "\n".join([str(error), repr(error), *traceback.format_exception(error)])


# --- TLS -----------------------------------------------------------------------------------


async def test_publish_and_consume_over_tls(tls_tansu: TlsTansu) -> None:
    url = tls_tansu.url(f"security_protocol=SSL&ssl_cafile={tls_tansu.cert}&{GROUP_OPTIONS}")
    topic = unique_name("tls")
    published = make_messages(topic, 5, key="k")
    async with connected(url) as t:
        await t.publish(topic, published)
        async with subscribed(t, topic, "tls-group") as sub:
            seen = await drain(sub, [m.id for m in published], timeout=30)
    assert sorted(seen) == sorted(m.id for m in published)
    for m in published:
        got = seen[m.id][0].message
        assert (got.payload, got.headers["seq"]) == (m.payload, m.headers["seq"])
    # the acks were committed: the group does not get them again
    async with connected(url) as t, subscribed(t, topic, "tls-group") as sub:
        assert await sub.fetch(100, 1.0) == []


async def test_untrusted_certificate_fails_clearly_and_boundedly(
    tls_tansu: TlsTansu, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    url = tls_tansu.url("security_protocol=SSL&connect_timeout=2")  # system CAs
    error = await connect_fails(url, within=BOUND)
    assert isinstance(error, PermanentTransportError)
    assert "TLS handshake" in str(error) and "CERTIFICATE_VERIFY_FAILED" in str(error)
    assert "ssl_cafile" in str(error)  # what to do about it


async def test_plaintext_client_against_the_tls_port_fails_boundedly(
    tls_tansu: TlsTansu,
) -> None:
    error = await connect_fails(tls_tansu.url("connect_timeout=2"), within=BOUND)
    assert isinstance(error, PermanentTransportError)
    assert "speaks TLS" in str(error) and "security_protocol=SSL" in str(error)


# --- SASL (over TLS) -------------------------------------------------------------------------


@pytest.mark.parametrize("tls_tansu", [True], indirect=True)
@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
async def test_failed_sasl_is_a_clear_error_without_the_password(
    tls_tansu: TlsTansu, mechanism: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)  # aiokafka logs every request at DEBUG
    url = tls_tansu.url(
        f"security_protocol=SASL_SSL&sasl_mechanism={mechanism}&ssl_cafile={tls_tansu.cert}"
        "&connect_timeout=2",
        credentials=f"app:{SECRET}@",
    )
    assert SECRET not in open_transport(url).url
    error = await connect_fails(url, SECRET, within=BOUND)
    # SCRAM is refused at once; PLAIN Tansu answers by closing the connection (retried)
    assert isinstance(error, PermanentTransportError) is mechanism.startswith("SCRAM")
    assert "app:***@" in str(error)
    assert SECRET not in caplog.text


def test_credentials_without_sasl_are_refused_without_the_password(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    with pytest.raises(ValueError) as e:
        open_transport(f"kafka://app:{SECRET}@127.0.0.1:9?security_protocol=SSL")
    assert "SASL_SSL" in str(e.value)
    assert SECRET not in _text(e.value)
    assert SECRET not in caplog.text
