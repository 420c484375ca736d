"""Kafka transactions on noida-db (127.0.0.1:9093), the test broker that has them: the
App-level transactional tests, an aborted transaction that read_committed readers never see
while its delivery stays unacked, and a committed one whose offsets hold after a restart of
the group. (Tansu has no transactions: ``test_transactions.py`` checks the app refuses to
start there.)"""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import KafkaConnectionError

from herald import App
from herald.testing.helpers import connected, subscribed
from herald.testing.servers import require_server
from herald.transports import TransportError
from herald.transports.base import Delivery

from . import test_transactions as tx
from .conftest import topic

pytestmark = pytest.mark.anyio

BOOTSTRAP = "127.0.0.1:9093"
URL = (
    f"kafka://{BOOTSTRAP}?session_timeout_ms=6000&heartbeat_interval_ms=300"
    "&isolation_level=read_committed"
)


@pytest.fixture
def url() -> str:
    require_server("kafka", port=9093)
    return URL


async def test_app_transactional_subscribers(url: str) -> None:
    await tx.test_transactional_outputs_appear_exactly_once(url)
    await tx.test_publisher_return_value_is_part_of_the_transaction(url)
    await tx.test_failed_commit_publishes_nothing_and_keeps_the_delivery(url)


async def _read_all(t: str, isolation: str) -> list[bytes]:
    """Everything a plain consumer with ``isolation`` reads from ``t`` within ~3 s."""
    consumer = AIOKafkaConsumer(
        t, bootstrap_servers=BOOTSTRAP, auto_offset_reset="earliest", isolation_level=isolation
    )
    await consumer.start()
    out: list[bytes] = []
    try:
        with anyio.move_on_after(3):
            while True:
                for records in (await consumer.getmany(timeout_ms=200)).values():
                    out += [r.value for r in records]
    finally:
        await consumer.stop()
    return out


async def _one(sub: Any) -> list[Delivery]:
    with anyio.fail_after(30):
        while True:
            got: list[Delivery] = await sub.fetch(1, 0.5)
            if got:
                return got


async def test_aborted_transaction_is_invisible_and_keeps_the_delivery(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    t_in, t_out = topic(), topic()
    app = App("tx", broker=url)  # only to build envelopes
    async with connected(url) as transport:
        await transport.publish(t_in, [app.message(t_in, {"n": 0})])
        async with subscribed(transport, t_in, "g") as sub:
            got = await _one(sub)

            async def broken(*args: object, **kwargs: object) -> None:
                raise KafkaConnectionError("injected: the offsets could not be added")

            # the records below reach the broker; the transaction then fails and is aborted
            with monkeypatch.context() as m:
                m.setattr(AIOKafkaProducer, "send_offsets_to_transaction", broken)
                with pytest.raises(TransportError, match="aborted"):
                    await sub.commit(got, [app.message(t_out, {"n": i}) for i in range(3)])
            assert len(await _read_all(t_out, "read_uncommitted")) == 3  # they were written
            assert await _read_all(t_out, "read_committed") == []  # and aborted
            # the delivery is still ours, unacked: this time the transaction goes through
            await sub.commit(got, [app.message(t_out, {"n": 9})])
        assert len(await _read_all(t_out, "read_committed")) == 1
        async with subscribed(transport, t_in, "g") as again:  # offsets came with the commit
            assert await again.fetch(10, 2.0) == []
        for t in (t_in, t_out):
            await transport.delete_topic(t)
