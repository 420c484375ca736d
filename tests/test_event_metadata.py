"""ctx.occurred_at, the schema_version header and the core's version declaration."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pydantic
import pytest

import herald.eventsourcing
from herald import App, Context
from herald.codec import declared_version, event_type, schema_version

from .conftest import topic, wait_until

pytestmark = pytest.mark.anyio


@event_type("shop.OrderPlaced", version=2)
class OrderPlacedV2(pydantic.BaseModel):
    order_id: str


class Unversioned(pydantic.BaseModel):
    order_id: str


class ByAttribute(pydantic.BaseModel):
    __herald_version__ = 3
    order_id: str


def test_the_version_is_declared_in_the_core_and_used_by_eventsourcing() -> None:
    assert declared_version(OrderPlacedV2) == 2
    assert declared_version(ByAttribute) == 3
    assert declared_version(Unversioned) is None
    assert schema_version(Unversioned) == 1
    assert herald.eventsourcing.schema_version is schema_version
    with pytest.raises(TypeError, match="int >= 1"):
        event_type("x", version=0)
    with pytest.raises(TypeError, match="int >= 1"):
        event_type("x", version=True)


async def test_schema_version_and_occurred_at_reach_the_handler(broker_url: str) -> None:
    t = topic()
    app = App("svc", broker=broker_url)
    seen: list[tuple[str, int | None, datetime | None]] = []

    @app.subscriber(t, group="g")
    async def handle(e: OrderPlacedV2 | Unversioned | ByAttribute, ctx: Context) -> None:
        seen.append((e.order_id, ctx.schema_version, ctx.occurred_at))

    before = datetime.now(UTC) - timedelta(seconds=1)
    async with app:
        await app.publish(t, OrderPlacedV2(order_id="a"))
        await app.publish(t, Unversioned(order_id="b"))
        await app.publish(t, ByAttribute(order_id="c"))
        await app.publish(t, Unversioned(order_id="d"), headers={"occurred_at": "yesterday"})
        await app.publish(
            t, Unversioned(order_id="e"), headers={"occurred_at": "2026-01-01T10:00:00"}
        )
        await app.publish(
            t, Unversioned(order_id="f"), headers={"occurred_at": "2026-01-01T12:00:00+02:00"}
        )
        await wait_until(lambda: len(seen) == 6)
    after = datetime.now(UTC) + timedelta(seconds=1)
    by_id = {oid: (v, at) for oid, v, at in seen}
    assert [by_id[k][0] for k in "abcdef"] == [2, None, 3, None, None, None]
    for k in "abc":
        at = by_id[k][1]
        assert at is not None and at.tzinfo is UTC and before <= at <= after
    assert by_id["d"][1] is None  # malformed
    assert by_id["e"][1] is None  # no offset: not a point in time
    assert by_id["f"][1] == datetime(2026, 1, 1, 10, 0, tzinfo=UTC)


def test_a_plain_message_has_no_occurred_at_or_version() -> None:
    from herald.message import Message, new_id

    app = App("svc", broker="memory://")
    ctx = Context(app, Message(id=new_id(), topic="t", payload=b"{}"), 1, "g")
    assert ctx.occurred_at is None
    assert ctx.schema_version is None
