"""The transport conformance suite against Mosquitto (``mqtt://127.0.0.1:1883``).

MQTT cannot replay (``features.replay`` is False): a group receives only what is published
after it first subscribed. The suite makes its groups exist before publishing wherever replay
is not the property under test, and skips the replay tests.
"""

from __future__ import annotations

import functools
from typing import Any

import pytest

from herald.testing.conformance import TransportConformance
from herald.testing.servers import require_server


class TestMqtt(TransportConformance):
    """MQTT 5 over Mosquitto 2: shared subscriptions, persistent sessions, manual acks."""

    @pytest.fixture
    def broker_url(self) -> str:
        require_server("mqtt")
        return "mqtt://127.0.0.1:1883"


# Open defect, not hidden: with persistent sessions closed and resumed quickly, Mosquitto
# 2.0.11 sometimes redelivers (DUP) a message whose PUBACK the consumer had sent and flushed,
# so an acked message comes back once. Seen in about 1 run in 3 of these two tests only.
_MOSQUITTO_RESUME = pytest.mark.xfail(
    strict=False,
    reason="Mosquitto may redeliver an acked message after a quick session resume (open)",
)


def _mosquitto_resume(name: str) -> Any:
    """A TestMqtt-only copy of the inherited test, marked; the base function stays unmarked."""
    inherited = getattr(TransportConformance, name)

    @_MOSQUITTO_RESUME
    @functools.wraps(inherited)
    async def test(self: TestMqtt, *args: Any, **kwargs: Any) -> None:
        await inherited(self, *args, **kwargs)

    return test


for _name in (
    "test_subscribe_close_churn_corrupts_nothing",
    "test_closing_consumers_mid_stream_loses_nothing",
):
    setattr(TestMqtt, _name, _mosquitto_resume(_name))
