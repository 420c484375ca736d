"""What every part of the conformance suite shares: the knobs a transport's test class sets, the
fixtures, and small helpers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import ClassVar

import pytest

from herald.testing.helpers import (
    connected,
)
from herald.transports import Transport


class Suite:
    """Knobs, fixtures and helpers shared by every part of the conformance suite."""

    pytestmark = pytest.mark.anyio

    #: Query parameters appended to the URL by :meth:`redelivery_url` to get a short visibility
    #: timeout / lease, e.g. ``"visibility_timeout=1"``. Empty: the URL is used unchanged.
    lease_query: ClassVar[str] = ""
    #: Seconds within which a crashed consumer's deliveries must come back (redelivery URL).
    redelivery_timeout: ClassVar[float] = 15.0
    #: Seconds within which a published (or released) message must be delivered.
    delivery_timeout: ClassVar[float] = 10.0
    #: Seconds a test waits to conclude that nothing more is delivered.
    quiet_period: ClassVar[float] = 0.4
    #: How many seconds early a ``nack(delay=...)`` redelivery may arrive.
    delay_tolerance: ClassVar[float] = 0.1

    # -- fixtures a subclass provides or may override --

    @pytest.fixture
    def anyio_backend(self) -> str:
        """The suite runs on asyncio."""
        return "asyncio"

    @pytest.fixture
    def broker_url(self) -> str:
        """The URL of the transport under test; a subclass must override this fixture."""
        raise NotImplementedError("subclass TransportConformance and provide a broker_url fixture")

    def redelivery_url(self, url: str) -> str:
        """Return ``url`` configured for a short visibility timeout (crash/cancel tests)."""
        if not self.lease_query:
            return url
        return f"{url}{'&' if '?' in url else '?'}{self.lease_query}"

    def counts_crash_redeliveries(self, url: str) -> bool:
        """Whether the engine behind ``url`` lets the transport count redeliveries after a
        crash (``attempt >= 2``). True unless a subclass knows of a broker defect, which it
        should prove with a test of its own."""
        return True

    @pytest.fixture
    async def transport(self, broker_url: str) -> AsyncIterator[Transport]:
        """A connected transport for ``broker_url``, closed after the test."""
        async with connected(broker_url) as transport:
            yield transport

    async def create_groups(self, transport: Transport, topic: str, *groups: str) -> None:
        """Make ``groups`` exist on ``topic`` before a test publishes to it. Without
        ``features.replay`` (MQTT) a group only receives what is published after it first
        subscribed; with ``replay`` this is a no-op, so the tests check the same property."""
        if transport.features.replay:
            return
        for group in groups:
            sub = await transport.subscribe(topic, group)
            await sub.close()
