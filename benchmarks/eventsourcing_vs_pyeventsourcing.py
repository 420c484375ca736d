"""Herald's event store vs pyeventsourcing 9.5, side by side in one run, same SQLite setup.

Both write to a fresh SQLite file in WAL mode with ``synchronous=FULL`` (pyeventsourcing's
default; Herald's store uses the same), so every command's commit is fsync'd: same durability.

Figures (median of ROUNDS runs each):

* append, 1 event per command: N aggregates, each records one event and is saved.
  Herald twice: commands one after another (like pyeventsourcing's synchronous API), and
  64 commands in flight (async callers; concurrent appends share a commit: group commit).
* append, 20 events per command.
* load an aggregate of 2,000 events, without and with a snapshot.
* projection: Herald projection applying stored events into an SQLite read model (events/s),
  catching up from the start and live behind the relay on the SQLite broker.

    python benchmarks/eventsourcing_vs_pyeventsourcing.py          # ROUNDS=5 N=1000
    ROUNDS=3 N=500 python benchmarks/eventsourcing_vs_pyeventsourcing.py

Targets (issue 10): Herald >= 2x pyeventsourcing on each append figure, <= its load time; a
projection keeps up with >= 20,000 events/s on SQLite. Needs ``pip install 'herald[bench]'``.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import msgspec
from eventsourcing.application import Application
from eventsourcing.domain import Aggregate as PyAggregate
from eventsourcing.domain import event as py_event

from herald import App
from herald.eventsourcing import Aggregate, EventStore, Repository, Tx, projection

ROUNDS = int(os.environ.get("ROUNDS", "5"))
N = int(os.environ.get("N", "1000"))
LOAD_EVENTS = 2000
PROJECTION_EVENTS = 40_000


# --- the same aggregate in both libraries ------------------------------------------------


class Deposited(msgspec.Struct):
    amount: int


class HAccount(Aggregate):
    balance: int = 0

    def on_deposited(self, e: Deposited) -> None:
        self.balance += e.amount


class HSnapAccount(HAccount):
    snapshot_every = LOAD_EVENTS


class PyAccount(PyAggregate):
    @py_event("Created")
    def __init__(self) -> None:
        self.balance = 0

    @py_event("Deposited")
    def deposit(self, amount: int) -> None:
        self.balance += amount


def py_app(path: Path, snapshots: bool = False) -> Application:
    env = {"PERSISTENCE_MODULE": "eventsourcing.sqlite", "SQLITE_DBNAME": str(path)}
    if snapshots:
        env["IS_SNAPSHOTTING_ENABLED"] = "y"
    return Application(env=env)


# --- pyeventsourcing ----------------------------------------------------------------------


def py_append(path: Path, per_command: int) -> float:
    app = py_app(path)
    aggs = [PyAccount() for _ in range(N)]  # created (one event each) outside the timing
    app.save(*aggs)
    t = time.perf_counter()
    for a in aggs:
        for _ in range(per_command):
            a.deposit(1)
        app.save(a)
    elapsed = time.perf_counter() - t
    app.close()
    return N / elapsed


def py_load(path: Path, snapshot: bool) -> float:
    app = py_app(path, snapshots=snapshot)
    a = PyAccount()
    for _ in range(LOAD_EVENTS - 1):
        a.deposit(1)
    app.save(a)
    if snapshot:
        app.take_snapshot(a.id)
    times = []
    for _ in range(20):
        t = time.perf_counter()
        got = app.repository.get(a.id)
        times.append(time.perf_counter() - t)
    assert got.balance == LOAD_EVENTS - 1
    app.close()
    return statistics.median(times)


# --- Herald -------------------------------------------------------------------------------


async def h_append(path: Path, per_command: int, in_flight: int) -> float:
    async with EventStore(f"sqlite:///{path}") as store:
        repo = Repository(HAccount, store)
        aggs = [repo.new(f"a{i}") for i in range(N)]
        for a in aggs:
            a.record(Deposited(0))  # "created", stored outside the timing
        for a in aggs:
            await repo.save(a)
        t = time.perf_counter()

        async def worker(chunk: list[HAccount]) -> None:
            for a in chunk:
                for _ in range(per_command):
                    a.record(Deposited(1))
                await repo.save(a)

        async with anyio.create_task_group() as tg:
            for k in range(in_flight):
                tg.start_soon(worker, aggs[k::in_flight])
        return N / (time.perf_counter() - t)


async def h_load(path: Path, snapshot: bool) -> float:
    cls = HSnapAccount if snapshot else HAccount
    async with EventStore(f"sqlite:///{path}") as store:
        repo = Repository(cls, store)
        a = repo.new("big")
        for _ in range(LOAD_EVENTS):
            a.record(Deposited(1))
        await repo.save(a)  # with snapshot_every=2000 this save also stores the snapshot
        times = []
        for _ in range(20):
            t = time.perf_counter()
            got = await repo.get("big")
            times.append(time.perf_counter() - t)
        assert got.balance == LOAD_EVENTS
        return statistics.median(times)


class Totals:
    tables = ("totals",)

    async def setup(self, tx: Tx) -> None:
        await tx.execute(
            "CREATE TABLE IF NOT EXISTS totals (id TEXT PRIMARY KEY, n INTEGER, total INTEGER)"
        )

    async def on_deposited(self, e: Deposited, tx: Tx) -> None:
        assert tx.recorded is not None
        await tx.execute(
            "INSERT INTO totals VALUES (?, 1, ?) ON CONFLICT (id) DO UPDATE SET n = n + 1,"
            " total = total + excluded.total",
            (tx.recorded.stream, e.amount),
        )


async def fill(store: EventStore, n: int) -> None:
    per = 100
    for i in range(n // per):
        await store.append(f"s{i % 50}-{i}", [Deposited(1)] * per, 0, topic="bench_account")


async def h_projection_catch_up(tmp: Path) -> float:
    store = EventStore(f"sqlite:///{tmp / 'p.db'}")
    p = projection(None, store, db=f"sqlite:///{tmp / 'pr.db'}", topics=["bench_account"])(Totals)
    async with store, p:
        await fill(store, PROJECTION_EVENTS)
        t = time.perf_counter()
        n = await p.catch_up()
        elapsed = time.perf_counter() - t
    assert n == PROJECTION_EVENTS
    return n / elapsed


async def h_projection_live(tmp: Path) -> float:
    """Events saved with the relay on; the projection follows through the SQLite broker, all
    in this one process. Returns events/s until the projection applied the last one; prints
    how long after the last save that was (the projection's lag)."""
    app = App("bench", broker=f"sqlite:///{tmp / 'b.db'}")
    store = EventStore(f"sqlite:///{tmp / 'b.db'}")
    repo = Repository(HAccount, store, app=app, topic="bench_account")
    p = projection(app, store, db=f"sqlite:///{tmp / 'lr.db'}", topics=["bench_account"])(Totals)

    async def writer(k: int) -> None:
        for i in range(k, PROJECTION_EVENTS // 100, 8):
            a = repo.new(f"live-{i}")
            for _ in range(100):
                a.record(Deposited(1))
            await repo.save(a)

    async with app:
        t = time.perf_counter()
        async with anyio.create_task_group() as tg:  # 8 commands in flight
            for k in range(8):
                tg.start_soon(writer, k)
        written = time.perf_counter()
        head = await store.head()
        with anyio.fail_after(120):
            while p.position < head:
                await anyio.sleep(0.001)
        elapsed = time.perf_counter() - t
    lag_ms = (time.perf_counter() - written) * 1000
    print(f"    (live run: projection done {lag_ms:.1f} ms after the last save)", flush=True)
    return PROJECTION_EVENTS / elapsed


# --- running ------------------------------------------------------------------------------


def median_of(run: Callable[[Path], float]) -> float:
    out = []
    for _ in range(ROUNDS):
        with tempfile.TemporaryDirectory() as d:
            out.append(run(Path(d)))
    return statistics.median(out)


def main() -> None:
    print(f"Herald event store vs pyeventsourcing 9.5 on SQLite (median of {ROUNDS} runs, N={N})")
    rows: list[tuple[str, float, float, str, str]] = []

    def both(label: str, herald: Callable[[Path], float], py: Callable[[Path], float],
             unit: str, higher_is_better: bool = True) -> None:  # fmt: skip
        h, p = median_of(herald), median_of(py)
        ratio = h / p if higher_is_better else p / h
        rows.append((label, h, p, unit, f"{ratio:.2f}x"))
        verdict = "faster" if ratio >= 1 else "slower"
        print(f"  {label:<44} herald {h:>10,.1f} {unit:<9} pyeventsourcing {p:>10,.1f} {unit:<9}"
              f" herald is {ratio:.2f}x {verdict}", flush=True)  # fmt: skip

    def run_h(fn: Any, *args: Any) -> Callable[[Path], float]:
        return lambda d: anyio.run(fn, d / "h.db", *args)

    both("append 1 event/command, sequential", run_h(h_append, 1, 1),
         lambda d: py_append(d / "p.db", 1), "cmds/s")  # fmt: skip
    both("append 1 event/command, 64 in flight", run_h(h_append, 1, 64),
         lambda d: py_append(d / "p.db", 1), "cmds/s")  # fmt: skip
    both("append 20 events/command, sequential", run_h(h_append, 20, 1),
         lambda d: py_append(d / "p.db", 20), "cmds/s")  # fmt: skip
    both("append 20 events/command, 64 in flight", run_h(h_append, 20, 64),
         lambda d: py_append(d / "p.db", 20), "cmds/s")  # fmt: skip
    us = 1e6
    both("load 2,000 events, no snapshot", lambda d: us * anyio.run(h_load, d / "h.db", False),
         lambda d: us * py_load(d / "p.db", False), "µs", higher_is_better=False)  # fmt: skip
    both("load 2,000 events, with snapshot", lambda d: us * anyio.run(h_load, d / "h.db", True),
         lambda d: us * py_load(d / "p.db", True), "µs", higher_is_better=False)  # fmt: skip
    catch = median_of(lambda d: anyio.run(h_projection_catch_up, d))
    live = median_of(lambda d: anyio.run(h_projection_live, d))
    print(f"  projection catch-up from the start (SQLite read model): {catch:,.0f} events/s")
    print(f"  projection live: saves of 100 events (8 in flight) -> relay -> SQLite broker ->"
          f" projection, one process, until the last is applied: {live:,.0f} events/s")  # fmt: skip


if __name__ == "__main__":
    main()
