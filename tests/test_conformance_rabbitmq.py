"""The transport conformance suite against the local RabbitMQ server."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from herald.testing.conformance import TransportConformance
from herald.testing.servers import require_server
from herald.transports import open_transport
from herald.transports.rabbitmq import transport as rabbitmq_module

URL = "amqp://guest:guest@127.0.0.1:5672/"


class TestRabbitMQ(TransportConformance):
    """RabbitMQ 3.10: a classic queue per group, TTL delay queues, publisher confirms.

    A crashed consumer's deliveries come back as soon as the broker sees its connection
    drop, so no lease knob is needed (``lease_query`` stays empty). The crash tests also
    check that the consumer kept open between fetches is paused before an ack, so the
    window an ack frees is not refilled into the killed worker's buffer (messages it never
    fetched must come back at attempt 1)."""

    @pytest.fixture
    def broker_url(self) -> str:
        require_server("rabbitmq")
        return URL

    @pytest.fixture(autouse=True)
    async def _remove_test_objects(self) -> AsyncIterator[None]:
        """The suite never deletes its topics; remove every exchange and queue this test
        created, so the shared server keeps no junk."""
        before = set(rabbitmq_module._created_groups)
        yield
        created = set(rabbitmq_module._created_groups) - before
        if not created:
            return
        async with open_transport(URL) as transport:
            for name in sorted(created, key=len, reverse=True):
                if name in rabbitmq_module._created_groups:
                    await transport.delete_topic(name)
