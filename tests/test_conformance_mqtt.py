"""The transport conformance suite against Mosquitto (``mqtt://127.0.0.1:1883``).

MQTT cannot replay (``features.replay`` is False): a group receives only what is published
after it first subscribed. The suite makes its groups exist before publishing wherever replay
is not the property under test, and skips the replay tests.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from herald.testing.conformance import TransportConformance, connected
from herald.testing.servers import require_server
from herald.transports import Subscription
from herald.transports.mqtt import MqttTransport


class TestMqtt(TransportConformance):
    """MQTT 5 over Mosquitto 2: shared subscriptions, persistent sessions, manual acks."""

    @pytest.fixture
    def broker_url(self) -> str:
        require_server("mqtt")
        return "mqtt://127.0.0.1:1883"

    @pytest.fixture(autouse=True)
    async def leave_nothing_behind(
        self, broker_url: str, monkeypatch: pytest.MonkeyPatch
    ) -> AsyncIterator[None]:
        """Delete the persistent sessions and retained bookkeeping of every topic a test
        subscribed to (through any transport of this process), so runs leave nothing behind."""
        topics: set[str] = set()
        subscribe = MqttTransport.subscribe

        async def recording(self: MqttTransport, topic: str, group: str, **kw: Any) -> Subscription:
            sub = await subscribe(self, topic, group, **kw)
            topics.add(topic)  # only valid names get here
            return sub

        monkeypatch.setattr(MqttTransport, "subscribe", recording)
        yield
        monkeypatch.undo()
        async with connected(broker_url) as transport:
            assert isinstance(transport, MqttTransport)
            for topic in sorted(topics):
                await transport.delete_topic(topic)
