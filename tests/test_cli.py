"""The CLI and the read-only tooling: tail, topics, groups, dlq list/show, --version.

Each command runs against the real server of every engine where it is supported, and shows a
clear one-line error where it is not. No read-only tool may change what a group receives.
"""

from __future__ import annotations

import anyio
import pytest

from herald.dlq import DeadLetters
from herald.testing.helpers import make_messages
from herald.transports import open_transport

from .conftest import BROKERS, require_server, topic

RABBITMQ = BROKERS["rabbitmq"]


@pytest.mark.anyio
async def test_dlq_tool_on_an_ordinary_rabbitmq_topic_takes_nothing() -> None:
    """Publish 4 to a topic no group has joined (RabbitMQ parks them for the first group), point
    the DLQ tool at it: it refuses, and the first real group still gets all 4 (it got [])."""
    require_server("rabbitmq")
    t = topic()
    async with open_transport(RABBITMQ) as transport:
        await transport.publish(t, make_messages(t, 4))
        with pytest.raises(ValueError, match="herald tail"):
            async with DeadLetters(transport, t) as dlq:
                await dlq.list()
        sub = await transport.subscribe(t, "billing")
        got: list[bytes] = []
        with anyio.fail_after(10):
            while len(got) < 4:
                batch = await sub.fetch(10, 0.5)
                await sub.ack(batch)
                got += [d.message.payload for d in batch]
        await sub.close()
    assert sorted(got) == [b"m-0", b"m-1", b"m-2", b"m-3"]
