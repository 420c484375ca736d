"""The transport conformance suite against the local NATS JetStream server.

``ack_wait=1`` gives the crash and cancellation tests a 1 s visibility timeout. Every topic is a
fresh stream (unique name); each test's streams are deleted afterwards, so the shared server
keeps no junk.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from herald.testing.conformance import TransportConformance
from herald.testing.servers import require_server
from herald.transports import open_transport

URL = "nats://127.0.0.1:4222"


class TestNats(TransportConformance):
    """NATS JetStream (file storage)."""

    lease_query = "ack_wait=1"

    @pytest.fixture
    def broker_url(self) -> str:
        require_server("nats")
        return URL

    @pytest.fixture(autouse=True)
    async def _drop_test_streams(self) -> AsyncIterator[None]:
        """Delete the streams this test created (names come from unique_name(), so any
        stream not there before the test is this test's)."""
        require_server("nats")
        async with open_transport(URL) as t:
            before = set(await t._stream_names(t._require()))  # type: ignore[attr-defined]
        yield
        async with open_transport(URL) as t:
            jsm = t._jsm  # type: ignore[attr-defined]
            for name in set(await t._stream_names(t._require())) - before:  # type: ignore[attr-defined]
                await jsm.delete_stream(name)
