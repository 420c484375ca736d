"""The event store and the repository on SQLite and PostgreSQL: optimistic concurrency,
reading in commit order, snapshots, time travel, bad input."""

from __future__ import annotations

import sqlite3

import anyio
import pytest

from herald.eventsourcing import (
    Aggregate,
    AggregateNotFound,
    ConcurrencyError,
    EventStore,
    Repository,
    UnknownEvent,
)

from .es_support import Account, AccountOpened, MoneyDeposited, db_fixture  # noqa: F401

pytestmark = pytest.mark.anyio


async def test_append_and_read(db: tuple[str, str]) -> None:
    url, prefix = db
    async with EventStore(url, prefix=prefix) as store:
        recs = await store.append("a", [AccountOpened("ada"), MoneyDeposited(5)], 0, topic="acc")
        assert [r.version for r in recs] == [1, 2]
        assert recs[0].position < recs[1].position
        await store.append("b", [AccountOpened("bob")], 0)
        await store.append("a", [MoneyDeposited(7)], 2, headers={"correlation_id": "c1"})
        got = await store.read("a")
        assert [(r.version, r.type) for r in got] == [
            (1, "AccountOpened"),
            (2, "MoneyDeposited"),
            (3, "MoneyDeposited"),
        ]
        assert got[2].headers == {"correlation_id": "c1"}
        assert [r.version for r in await store.read("a", after_version=1, to_version=2)] == [2]
        every = await store.read_all()
        assert [(r.stream, r.version) for r in every] == [("a", 1), ("a", 2), ("b", 1), ("a", 3)]
        assert [r.position for r in every] == sorted(r.position for r in every)
        assert [r.stream for r in await store.read_all(topics=["acc"])] == ["a", "a"]
        assert await store.head() == every[-1].position


async def test_stale_append_names_stream_expected_and_actual(db: tuple[str, str]) -> None:
    url, prefix = db
    async with EventStore(url, prefix=prefix) as store:
        await store.append("acc-1", [AccountOpened("ada")], 0)
        with pytest.raises(ConcurrencyError) as info:
            await store.append("acc-1", [MoneyDeposited(1)], 0)
        e = info.value
        assert (e.stream, e.expected, e.actual) == ("acc-1", 0, 1)
        assert "'acc-1'" in str(e) and "version 1" in str(e) and "expected 0" in str(e)
        assert len(await store.read("acc-1")) == 1  # nothing written


async def test_bad_input_is_refused(db: tuple[str, str]) -> None:
    url, prefix = db
    async with EventStore(url, prefix=prefix) as store:
        with pytest.raises(TypeError, match="cannot store a dict"):
            await store.append("s", [{"amount": 1}], 0)
        with pytest.raises(ValueError, match="non-empty"):
            await store.append("", [MoneyDeposited(1)], 0)
        with pytest.raises(ValueError, match="expected_version"):
            await store.append("s", [MoneyDeposited(1)], -1)
    with pytest.raises(ValueError, match="scheme"):
        EventStore("bank.db")
    with pytest.raises(ValueError, match="prefix"):
        EventStore(url, prefix="x; DROP TABLE")


async def test_two_writers_1000_rounds_no_lost_update_no_duplicate_version(
    db: tuple[str, str],
) -> None:
    """Each round both writers load the same version and save: exactly one wins, the loser
    reloads and retries. After 1,000 rounds the balance has every deposit and versions are
    1..n with no gap and no duplicate."""
    url, prefix = db
    rounds = 1000
    async with (
        EventStore(url, prefix=prefix) as s1,
        EventStore(url, prefix=prefix) as s2,  # two connections: two writers
    ):
        r1, r2 = Repository(Account, s1), Repository(Account, s2)
        acc = r1.new("acc")
        acc.open("ada")
        await r1.save(acc)
        conflicts = 0
        for _ in range(rounds):
            a, b = await r1.get("acc"), await r2.get("acc")
            assert a.version == b.version
            a.deposit(1)
            b.deposit(1)
            outcomes: dict[str, str] = {}

            async def save(
                name: str, repo: Repository[Account], agg: Account, out: dict[str, str]
            ) -> None:
                try:
                    await repo.save(agg)
                    out[name] = "won"
                except ConcurrencyError:
                    out[name] = "lost"

            async with anyio.create_task_group() as tg:
                tg.start_soon(save, "one", r1, a, outcomes)
                tg.start_soon(save, "two", r2, b, outcomes)
            assert sorted(outcomes.values()) == ["lost", "won"]
            conflicts += 1
            # the loser reloads and retries through the bounded helper
            loser = r1 if outcomes["one"] == "lost" else r2
            await loser.update("acc", lambda x: x.deposit(1))
        final = await r1.get("acc")
        assert final.balance == 2 * rounds
        versions = [r.version for r in await s1.read("acc")]
        assert versions == list(range(1, 2 * rounds + 2))
        assert conflicts == rounds


async def test_update_retries_a_bounded_number_of_times(db: tuple[str, str]) -> None:
    url, prefix = db
    async with EventStore(url, prefix=prefix) as store:
        repo = Repository(Account, store)
        await repo.update("acc", lambda a: a.open("ada"), create=True)
        calls = 0

        async def racing(acc: Account) -> None:
            nonlocal calls
            calls += 1
            acc.deposit(1)
            # another writer always gets in first
            other = await repo.get("acc")
            other.deposit(100)
            await repo.save(other)

        with pytest.raises(ConcurrencyError):
            await repo.update("acc", racing, attempts=3)
        assert calls == 3
        assert (await repo.get("acc")).balance == 300


async def test_group_commit_keeps_each_append_separate(db: tuple[str, str]) -> None:
    """Many concurrent appends share transactions, yet each one checks its own version."""
    url, prefix = db
    async with EventStore(url, prefix=prefix) as store:
        results: dict[int, str] = {}

        async def write(i: int) -> None:
            try:
                await store.append("shared", [MoneyDeposited(i)], 0)
                results[i] = "ok"
            except ConcurrencyError:
                results[i] = "conflict"

        async with anyio.create_task_group() as tg:
            for i in range(50):
                tg.start_soon(write, i)
                tg.start_soon(store.append, f"own-{i}", [MoneyDeposited(i)], 0)
        assert sorted(results.values()).count("ok") == 1
        assert len(await store.read("shared")) == 1
        assert len(await store.read_all(limit=1000)) == 51


async def test_snapshots_every_n_and_on_demand(db: tuple[str, str]) -> None:
    url, prefix = db

    class Snappy(Account):
        snapshot_every = 10

    async with EventStore(url, prefix=prefix) as store:
        repo = Repository(Snappy, store)
        acc = repo.new("s")
        acc.open("ada")
        for _ in range(24):
            acc.deposit(1)
        await repo.save(acc)  # version 25: crossed 10 and 20 -> one snapshot at 25
        snap = await store.backend.latest_snapshot("s", Snappy.kind())
        assert snap is not None and snap.version == 25
        for _ in range(3):
            await repo.update("s", lambda a: a.deposit(1))
        loaded = await repo.get("s")
        assert (loaded.version, loaded.balance) == (28, 27)
        await repo.snapshot(loaded)
        snap = await store.backend.latest_snapshot("s", Snappy.kind())
        assert snap is not None and snap.version == 28
        # a load uses the snapshot: events before it are not even read
        orig_read = store.read
        asked: list[int] = []

        async def spy(stream: str, after_version: int = 0, to_version: int | None = None):  # type: ignore[no-untyped-def]
            asked.append(after_version)
            return await orig_read(stream, after_version, to_version)

        store.read = spy  # type: ignore[method-assign]
        assert (await repo.get("s")).balance == 27
        assert asked == [28]


async def test_snapshot_of_an_older_class_shape_is_ignored(db: tuple[str, str]) -> None:
    url, prefix = db

    class V1(Aggregate):
        __herald_type__ = "Wallet"
        snapshot_every = 2
        balance: int = 0

        def on_dep(self, e: MoneyDeposited) -> None:
            self.balance += e.amount

    class V2(Aggregate):  # the same aggregate, a field added later
        __herald_type__ = "Wallet"
        balance: int = 0
        deposits: int = 0

        def on_dep(self, e: MoneyDeposited) -> None:
            self.balance += e.amount
            self.deposits += 1

    async with EventStore(url, prefix=prefix) as store:
        old = Repository(V1, store)
        w = old.new("w")
        for n in (1, 2, 3, 4):
            w.record(MoneyDeposited(n))
        await old.save(w)
        assert await store.backend.latest_snapshot("w", "Wallet") is not None
        new = await Repository(V2, store).get("w")
        assert (new.balance, new.deposits, new.version) == (10, 4, 4)  # replayed, not restored


async def test_time_travel_by_version_and_timestamp(db: tuple[str, str]) -> None:
    url, prefix = db
    now = [1_000_000.0]
    async with EventStore(url, prefix=prefix, clock=lambda: now[0]) as store:
        repo = Repository(Account, store)
        await repo.update("t", lambda a: a.open("ada"), create=True)
        now[0] += 86400
        await repo.update("t", lambda a: a.deposit(10))
        now[0] += 86400
        await repo.update("t", lambda a: a.deposit(5))
        assert (await repo.get("t", version=2)).balance == 10
        assert (await repo.get("t", at=1_000_000.0 + 86400 + 1)).balance == 10
        assert (await repo.get("t", at=1_000_000.0)).balance == 0
        with pytest.raises(AggregateNotFound, match="as of"):
            await repo.get("t", at=999_999.0)
        with pytest.raises(AggregateNotFound, match="at version 9"):
            await repo.get("t", version=9)
        with pytest.raises(AggregateNotFound):
            await repo.get("nobody")


async def test_an_event_with_no_class_is_a_clear_error(db: tuple[str, str]) -> None:
    url, prefix = db
    async with EventStore(url, prefix=prefix) as store:
        repo = Repository(Account, store)
        await repo.update("x", lambda a: a.open("ada"), create=True)
        await store.append("x", [MoneyDeposited(1)], 1)
        # a removed class: store a type no class is registered for
        events = store.encode([MoneyDeposited(2)], None)
        from dataclasses import replace

        events = [replace(events[0], type="AccountFrozen", schema_version=3)]
        await store.append_encoded("x", events, 2)
        with pytest.raises(UnknownEvent, match="'AccountFrozen' schema version 3"):
            await repo.get("x")


def test_sqlite_store_may_share_the_broker_file(tmp_path: object) -> None:
    from pathlib import Path

    path = Path(str(tmp_path)) / "shared.db"

    async def main() -> None:
        from herald import App

        app = App("bank", broker=f"sqlite:///{path}")
        async with app, EventStore(f"sqlite:///{path}") as store:
            await app.publish("t", {"x": 1})
            await store.append("a", [MoneyDeposited(1)], 0)

    anyio.run(main)
    tables = {r[0] for r in sqlite3.connect(path).execute("SELECT name FROM sqlite_master")}
    assert {"messages", "herald_es_events"} <= tables
