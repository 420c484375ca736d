"""The transport conformance suite on Kafka, once per Kafka-protocol broker.

* Tansu (127.0.0.1:9092, memory storage, no transactions)
* noida-db (127.0.0.1:9093, on disk, transactions)

Short group sessions and heartbeats keep the suite's many subscribe/close cycles fast.
Topics the suite creates (``<prefix>-<16 hex>`` names plus their ``.retry`` topics) are
deleted after the class.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import anyio
import pytest

from herald.testing.conformance import TransportConformance
from herald.testing.servers import require_server

BROKERS = {"tansu": 9092, "noida": 9093}
#: Tansu accepts short sessions (joins take max(1 s, session / 2)); noida-db, like Apache Kafka,
#: refuses sessions under 6 s (group.min.session.timeout.ms) and joins at once anyway
OPTIONS = {
    9092: "?session_timeout_ms=2000&heartbeat_interval_ms=300",
    9093: "?session_timeout_ms=6000&heartbeat_interval_ms=300",
}
_SUITE_NAME = re.compile(
    r"^_?[A-Za-z0-9.]+-[0-9a-f]{16}(\..*)?$|^_[0-9a-f]{32}|^A\.b-c_9\.|^t[0-9a-f]{32}x"
)


async def _topics(port: int) -> set[str]:
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=f"127.0.0.1:{port}")
    await admin.start()
    try:
        return set(await admin.list_topics())
    finally:
        await admin.close()


async def _delete(port: int, names: list[str]) -> None:
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=f"127.0.0.1:{port}")
    await admin.start()
    try:
        for i in range(0, len(names), 50):
            await admin.delete_topics(names[i : i + 50])
    finally:
        await admin.close()


@pytest.fixture(params=list(BROKERS), scope="class")
def kafka_port(request: pytest.FixtureRequest) -> int:
    port = BROKERS[request.param]
    require_server("kafka", port=port)
    return port


@pytest.fixture(scope="class")
def _cleanup(kafka_port: int) -> Iterator[None]:
    before = anyio.run(_topics, kafka_port)
    yield
    new = sorted(t for t in anyio.run(_topics, kafka_port) - before if _SUITE_NAME.match(t))
    if new:
        anyio.run(_delete, kafka_port, new)


class TestKafka(TransportConformance):
    """Kafka on both brokers. Crash redelivery counting relies on the commit metadata; see
    :meth:`counts_crash_redeliveries` for the broker that drops it."""

    @pytest.fixture
    def broker_url(self, kafka_port: int, _cleanup: None) -> str:
        return f"kafka://127.0.0.1:{kafka_port}{OPTIONS[kafka_port]}"

    @pytest.fixture(autouse=True)
    def _known_broker_defects(self, request: pytest.FixtureRequest, kafka_port: int) -> None:
        """``start="latest"`` needs ListOffsets(latest) to answer the log end offset; Tansu 0.6
        does not. Crash tests need (a) the broker to keep OffsetCommit metadata (handout counts) and
        (b) the broker to expire a SIGKILLed member after the session timeout. Tansu 0.6 drops
        the metadata (redeliveries after a crash come back with attempt 1); noida-db 0.2 never
        expires the dead member, so the next member's join never completes."""
        name = request.node.name
        if "start_latest" in name and kafka_port == 9092:
            # plain aiokafka shows it: test_kafka_transport.py::test_list_offsets_latest_is_log_end
            request.applymarker(
                pytest.mark.xfail(
                    reason="Tansu 0.6 ListOffsets(latest) answers the last batch's base offset "
                    "+ 1, not the log end: a 'latest' group re-reads the tail of that batch",
                    strict=True,
                )
            )
        if "transport_close_returns_unacked" in name and kafka_port == 9092:
            # the deliveries do come back; only their attempt count is lost with the metadata
            # (not strict: it passes when the other transport's first fetch held <= 4)
            reason = "Tansu 0.6 drops OffsetCommit metadata: redeliveries to another transport "
            reason += "come back with attempt 1"
            request.applymarker(pytest.mark.xfail(reason=reason, strict=False))
        if "killed_worker" in name and kafka_port == 9093:
            reason = "noida-db 0.2 never expires a SIGKILLed member: the next join hangs"
            request.applymarker(pytest.mark.xfail(reason=reason, strict=False))

    def counts_crash_redeliveries(self, url: str) -> bool:
        """Tansu 0.6 drops OffsetCommit metadata, where the handout counts travel, so its
        crash redeliveries come back at attempt 1 (everything else of the crash tests holds
        there). Shown with plain aiokafka in
        test_kafka_transport.py::test_commit_metadata_is_kept."""
        return ":9092" not in url
