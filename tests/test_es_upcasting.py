"""Upcasting: old stored events and old bus messages become the current class; old events are
never rewritten; an event nothing can decode is a clear error."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import pytest

from herald import App, Context
from herald.codec import event_type
from herald.eventsourcing import Aggregate, EventRegistry, EventStore, Repository, UnknownEvent
from herald.eventsourcing.upcasting import upcasting
from herald.message import SCHEMA_VERSION

from .conftest import topic, wait_until
from .es_support import db_fixture  # noqa: F401

pytestmark = pytest.mark.anyio


@event_type("bank.Deposited")
class DepositedV1(msgspec.Struct):
    cents: str  # v1 sent cents as a string


@event_type("bank.Deposited")
class Deposited(msgspec.Struct):
    __herald_version__ = 3
    amount: int  # v3: whole units, renamed field
    currency: str


def make_registry() -> EventRegistry:
    reg = EventRegistry()

    @reg.upcaster("bank.Deposited", 1)
    def cents_to_int(d: dict[str, Any]) -> dict[str, Any]:
        return {"amount_cents": int(d.pop("cents"))}

    @reg.upcaster("bank.Deposited", 2)
    def units_and_currency(d: dict[str, Any]) -> dict[str, Any]:
        return {"amount": d["amount_cents"] // 100, "currency": "EUR"}

    return reg


class Wallet(Aggregate):
    total: int = 0

    def on_dep(self, e: Deposited) -> None:
        self.total += e.amount


async def test_stored_old_versions_are_upcast_on_read_and_never_rewritten(
    db: tuple[str, str],
) -> None:
    url, prefix = db
    async with EventStore(url, prefix=prefix, registry=make_registry()) as store:
        await store.append("w", [DepositedV1(cents="500")], 0)  # written by the old code
        repo = Repository(Wallet, store)
        await repo.update("w", lambda w: w.record(Deposited(amount=7, currency="EUR")))
        w = await repo.get("w")
        assert w.total == 12
        recs = await store.read("w")
        assert [(r.type, r.schema_version) for r in recs] == [
            ("bank.Deposited", 1),
            ("bank.Deposited", 3),
        ]
        assert recs[0].payload == b'{"cents":"500"}'  # untouched
        assert store.decode(recs[0]) == Deposited(amount=5, currency="EUR")


async def test_a_missing_upcaster_names_type_and_version(db: tuple[str, str]) -> None:
    url, prefix = db
    reg = EventRegistry()
    async with EventStore(url, prefix=prefix, registry=reg) as store:
        await store.append("w", [DepositedV1(cents="500")], 0)
        repo = Repository(Wallet, store)
        with pytest.raises(UnknownEvent) as info:
            await repo.get("w")
        assert "'bank.Deposited' schema version 1" in str(info.value)
        assert "version 3" in str(info.value)


async def test_bus_messages_with_an_old_schema_version_are_upcast(tmp_path: Path) -> None:
    t = topic()
    app = App("bank", broker=f"sqlite:///{tmp_path / 'b.db'}")
    got: list[Deposited] = []
    reg = make_registry()

    @app.subscriber(t, group="ledger")
    @upcasting(reg)
    async def ledger(e: Deposited, ctx: Context) -> None:
        got.append(e)

    async with app:
        await app.publish(t, DepositedV1(cents="900"), headers={SCHEMA_VERSION: "1"})
        await app.publish(t, Deposited(amount=2, currency="USD"), headers={SCHEMA_VERSION: "3"})
        await app.publish(t, {"other": "type"}, type="bank.Closed")  # not ours: ignored
        await app.publish(t, b"\x00junk", type="bank.Deposited", headers={SCHEMA_VERSION: "3"})
        await wait_until(lambda: len(got) == 2)
        dlq = f"{t}.ledger.dlq"
        letters: list[Any] = []

        async def collect() -> None:
            from herald.dlq import DeadLetters

            async with DeadLetters(app.transport, dlq) as d:
                letters.extend(await d.list(10))

        await wait_until(lambda: app.consumers[0].stats.dead_lettered == 1)
        await collect()
    assert got == [Deposited(amount=9, currency="EUR"), Deposited(amount=2, currency="USD")]
    assert letters[0].headers["dlq.reason"] == "permanent error"  # raised by the handler
    assert letters[0].headers["dlq.error_type"].endswith("UnknownEvent")
    assert "'bank.Deposited' schema version 3" in letters[0].headers["dlq.error"]
