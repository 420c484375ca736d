"""The checks of ``test_connect_errors.py``: how one failed ``connect()`` must look on every
transport (one error, one line, the redacted URL, no secret, bounded time, a quiet log)."""

from __future__ import annotations

import logging
import time

import pytest

from herald.transports import PermanentTransportError, TransportError, open_transport

from .conftest import connect_fails

#: A permanent error fails well under this, with the default budget of CONNECT_TIMEOUT s.
FAST = 3.0
#: connect_timeout of the tests that wait for the budget to run out.
BUDGET = 2.0
#: Slack on top of the budget for a busy machine.
SLACK = 2.5
#: At most this many log records at INFO or above for one failed connect.
LOG_LINES = 2
SECRET = "s3cret-4711"


def with_query(url: str, query: str) -> str:
    """``url`` with ``query`` appended to its query string."""
    return f"{url}{'&' if '?' in url else '?'}{query}" if query else url


async def fails(
    url: str,
    caplog: pytest.LogCaptureFixture,
    *,
    permanent: bool,
    within: float,
    secrets: tuple[str, ...] = (SECRET,),
) -> TransportError:
    """``connect()`` to ``url`` raises one TransportError (permanent or not, as said) within
    ``within`` seconds: one line naming the redacted URL, no secret in it or in the log, and
    at most LOG_LINES records at INFO or above. Returns it."""
    caplog.set_level(logging.DEBUG)
    caplog.clear()
    started = time.monotonic()
    error = await connect_fails(url, *secrets, within=within)
    took = time.monotonic() - started
    text = str(error)
    assert isinstance(error, PermanentTransportError) is permanent, (
        f"{type(error).__name__}: {text}"
    )
    assert "\n" not in text, text
    t = open_transport(url)
    where = getattr(t, "path", None) or t.url.split("?")[0]  # SQLite: the path
    assert where in text, text
    for secret in secrets:
        assert secret not in caplog.text
    loud = [f"{r.name} {r.levelname}: {r.getMessage()}" for r in caplog.records if r.levelno >= 20]
    assert len(loud) <= LOG_LINES, (took, loud)
    return error


async def tls_mismatches(
    caplog: pytest.LogCaptureFixture, tls_url: str, plain_url: str, ca_option: str, tls_mode: str
) -> None:
    """Against a TLS port with a self-signed certificate: the TLS URL without the CA is an
    untrusted certificate, the plain URL a plain client on a TLS port; both permanent, both
    say TLS and what to change."""
    untrusted = await fails(tls_url, caplog, permanent=True, within=FAST)
    assert "TLS handshake" in str(untrusted) and "CERTIFICATE_VERIFY_FAILED" in str(untrusted)
    assert ca_option in str(untrusted)
    plain = await fails(plain_url, caplog, permanent=True, within=FAST)
    assert "speaks TLS" in str(plain) and tls_mode in str(plain)


async def tls_unanswered(caplog: pytest.LogCaptureFixture, url: str, plain_mode: str) -> None:
    """A TLS URL on a plain port whose server waits for more bytes than the ClientHello has:
    the handshake gets no answer, which is retried within the budget (a slow TLS server looks
    the same), then one error that says TLS."""
    error = await fails(
        with_query(url, f"connect_timeout={BUDGET:g}"),
        caplog,
        permanent=False,
        within=BUDGET + SLACK,
    )
    assert "TLS handshake" in str(error) and plain_mode in str(error)
