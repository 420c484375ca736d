"""SQLite-specific behaviour of :mod:`herald.transports.sqlite.transport`.

The generic transport contract is covered by the conformance suite; this file covers what only
the SQLite broker has: URL options, file errors, leases and their expiry, durable nack delays,
cleanup of the log, and several OS processes sharing one database file.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from herald.message import Message, new_id
from herald.transports import open_transport
from herald.transports.base import Delivery, Transport, TransportError
from herald.transports.sqlite import SqliteTransport
from herald.transports.sqlite.subscription import _ack_runs


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def url_for(path: Path, **options: object) -> str:
    query = "&".join(f"{k}={v}" for k, v in options.items())
    return f"sqlite:///{path}" + (f"?{query}" if query else "")


def msgs(n: int, topic: str = "orders", **fields: object) -> list[Message]:
    return [
        Message(id=new_id(), topic=topic, payload=f"m{i}".encode(), **fields)  # type: ignore[arg-type]
        for i in range(n)
    ]


def ids(deliveries: list[Delivery]) -> list[str]:
    return [d.message.id for d in deliveries]


def count_rows(db: Path, table: str, topic: str | None = None) -> int:
    conn = sqlite3.connect(db)
    try:
        if topic is None:
            return int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])
        sql = f"SELECT count(*) FROM {table} WHERE topic = ?"
        return int(conn.execute(sql, (topic,)).fetchone()[0])
    finally:
        conn.close()


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "herald.db"


@pytest.fixture
async def transport(db: Path) -> AsyncIterator[SqliteTransport]:
    t = SqliteTransport.from_url(url_for(db))
    await t.connect()
    try:
        yield t
    finally:
        await t.close()


# --- URLs ------------------------------------------------------------------------------------


def test_url_paths_and_options() -> None:
    rel = SqliteTransport.from_url("sqlite:///data/herald.db")
    assert rel.path == "data/herald.db"
    absolute = SqliteTransport.from_url(
        "sqlite:////var/lib/herald.db?visibility_timeout=2.5&synchronous=NORMAL"
        "&poll_interval=0.2&busy_timeout=0"
    )
    assert absolute.path == "/var/lib/herald.db"
    opts = absolute._options
    assert (opts.visibility_timeout, opts.synchronous, opts.poll_interval) == (2.5, "normal", 0.2)
    assert opts.busy_timeout == 0
    assert absolute.url.startswith("sqlite:////var/lib/herald.db")
    assert isinstance(open_transport("sqlite:///x.db"), SqliteTransport)
    spaced = SqliteTransport.from_url("sqlite:///my%20dir/h.db")
    assert spaced.path == "my dir/h.db"


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("sqlite:///x.db?colour=blue", "unknown sqlite URL option 'colour'"),
        ("sqlite:///x.db?visibility_timeout=soon", "not a number"),
        ("sqlite:///x.db?visibility_timeout=0", "> 0"),
        ("sqlite:///x.db?visibility_timeout=-1", "> 0"),
        ("sqlite:///x.db?poll_interval=nan", "finite"),
        ("sqlite:///x.db?busy_timeout=-1", ">= 0"),
        ("sqlite:///x.db?synchronous=off", "full or normal"),
        ("sqlite:///x.db?synchronous=full&synchronous=normal", "given twice"),
        ("sqlite:///x.db?visibility_timeout", "malformed query"),
        ("sqlite://host/x.db", "host part"),
        ("sqlite:///", "names no database file"),
        ("sqlite:///dir/", "names no database file"),
        ("sqlite:///x.db#frag", "fragment"),
        ("sqlite:///:memory:", "memory://"),
        ("postgres:///x.db", "not a sqlite URL"),
    ],
)
def test_bad_urls_raise_value_error(url: str, fragment: str) -> None:
    with pytest.raises(ValueError) as info:
        SqliteTransport.from_url(url)
    assert fragment in str(info.value)


def test_ack_runs_never_cover_a_held_lease() -> None:
    assert _ack_runs([1, 2, 3, 5, 6], []) == [(1, 6)]
    assert _ack_runs([1, 2, 3, 5, 6], [4]) == [(1, 3), (5, 6)]
    assert _ack_runs([1, 2, 3], [0, 9]) == [(1, 3)]
    assert _ack_runs([7], [7, 8]) == [(7, 7)]
    assert _ack_runs([], [1]) == []


# --- file errors -----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_missing_directory_is_a_transport_error(tmp_path: Path) -> None:
    (tmp_path / "plainfile").write_text("x")
    target = tmp_path / "plainfile" / "herald.db"
    with pytest.raises(TransportError) as info:
        await SqliteTransport.from_url(url_for(target)).connect()
    assert str(target) in str(info.value)


@pytest.mark.anyio
async def test_unopenable_path_is_a_transport_error(tmp_path: Path) -> None:
    # The path is a directory: sqlite itself refuses to open it.
    with pytest.raises(TransportError) as info:
        await SqliteTransport.from_url(url_for(tmp_path)).connect()
    assert str(tmp_path) in str(info.value)
    assert info.value.__cause__ is not None  # the sqlite3 error is chained, not leaked


@pytest.mark.anyio
async def test_file_that_is_not_a_database(tmp_path: Path) -> None:
    bogus = tmp_path / "notes.db"
    bogus.write_bytes(b"this is not a database, just some text\n" * 200)
    with pytest.raises(TransportError) as info:
        await SqliteTransport.from_url(url_for(bogus)).connect()
    assert str(bogus) in str(info.value)
    assert "not a SQLite database" in str(info.value)


@pytest.mark.anyio
async def test_database_of_another_application_is_refused(tmp_path: Path) -> None:
    other = tmp_path / "app.db"
    conn = sqlite3.connect(other)
    conn.execute("CREATE TABLE customers (id INTEGER)")
    conn.commit()
    conn.close()
    with pytest.raises(TransportError, match="other tables"):
        await SqliteTransport.from_url(url_for(other)).connect()


@pytest.mark.anyio
async def test_database_locked_past_busy_timeout(db: Path) -> None:
    async with SqliteTransport.from_url(url_for(db, busy_timeout=0.2)) as t:
        blocker = sqlite3.connect(db, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")
        try:
            with pytest.raises(TransportError) as info:
                await t.publish("orders", msgs(1))
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        assert "locked" in str(info.value) and str(db) in str(info.value)
        await t.publish("orders", msgs(1))  # usable again once the lock is gone
        assert count_rows(db, "messages") == 1


@pytest.mark.anyio
async def test_use_before_connect_and_after_close(db: Path) -> None:
    t = SqliteTransport.from_url(url_for(db))
    with pytest.raises(TransportError, match="not connected"):
        await t.publish("orders", msgs(1))
    with pytest.raises(TransportError, match="not connected"):
        await t.subscribe("orders", "g")
    await t.connect()
    await t.close()
    await t.close()  # idempotent
    with pytest.raises(TransportError, match="closed"):
        await t.publish("orders", msgs(1))


# --- envelope on disk ------------------------------------------------------------------------


@pytest.mark.anyio
async def test_fields_round_trip_and_plain_clients_interoperate(
    db: Path, transport: SqliteTransport
) -> None:
    sent = Message(
        id=new_id(),
        topic="ignored",
        payload=b"\x00\xff{}",
        key="customer-7",
        type="OrderPlaced",
        headers={"correlation_id": "c-1", "traceparent": "00-abc-def-01"},
    )
    await transport.publish("orders", [sent])
    # A plain client publishes with the documented columns; id and time have defaults.
    raw = sqlite3.connect(db)
    raw.execute("INSERT INTO messages (topic, payload) VALUES ('orders', x'6869')")
    raw.commit()
    stored = raw.execute(
        "SELECT headers, payload FROM messages WHERE key = 'customer-7'"
    ).fetchone()
    raw.close()
    assert stored == ('{"correlation_id":"c-1","traceparent":"00-abc-def-01"}', b"\x00\xff{}")

    sub = await transport.subscribe("orders", "g")
    got = await sub.fetch(10, timeout=1)
    assert [d.message for d in got[:1]] == [sent.replace(topic="orders")]
    plain = got[1].message
    assert (plain.payload, plain.key, plain.type, plain.headers) == (b"hi", None, None, {})
    assert plain.id
    await sub.ack(got)


# --- leases ----------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_expired_lease_is_redelivered_with_next_attempt(db: Path) -> None:
    url = url_for(db, visibility_timeout=0.4)
    async with SqliteTransport.from_url(url) as a, SqliteTransport.from_url(url) as b:
        await a.publish("orders", msgs(2))
        sub_a = await a.subscribe("orders", "g")
        sub_b = await b.subscribe("orders", "g")
        first = await sub_a.fetch(10, timeout=1)
        assert [d.attempt for d in first] == [1, 1]
        assert await sub_b.fetch(10, timeout=0) == []  # still leased to a

        again = await sub_b.fetch(10, timeout=5)  # a never acks: its lease runs out
        assert ids(again) == ids(first)
        assert [d.attempt for d in again] == [2, 2]
        await sub_b.ack(again)
        # a's late ack must not disturb b's lease, and nothing comes back after b acked.
        await sub_a.ack(first)
        await sub_b.close()
        assert await sub_a.fetch(10, timeout=0.6) == []


@pytest.mark.anyio
async def test_lease_expiry_is_not_hidden_behind_a_long_nack_delay(db: Path) -> None:
    url = url_for(db, visibility_timeout=0.3)
    async with SqliteTransport.from_url(url) as a, SqliteTransport.from_url(url) as b:
        await a.publish("orders", msgs(1))
        sub_a = await a.subscribe("orders", "g")
        (parked,) = await sub_a.fetch(1, timeout=1)
        await sub_a.nack(parked, delay=3600)
        await anyio.sleep(0.35)
        # This fetch finds nothing due and records that the next lease is due in an hour.
        assert await sub_a.fetch(1, timeout=0) == []
        await a.publish("orders", msgs(1))
        (lost,) = await sub_a.fetch(1, timeout=1)  # leased for 0.3 s, never acked
        sub_b = await b.subscribe("orders", "g")
        again = await sub_b.fetch(10, timeout=5)
        assert ids(again) == [lost.message.id] and again[0].attempt == 2
        await sub_b.ack(again)


@pytest.mark.anyio
async def test_nack_delay_survives_reopening(db: Path) -> None:
    async with SqliteTransport.from_url(url_for(db)) as t:
        await t.publish("orders", msgs(2))
        sub = await t.subscribe("orders", "g")
        first, second = await sub.fetch(2, timeout=1)
        await sub.nack(first, delay=0.8)
        nacked_at = time.monotonic()
        await sub.ack([second])

    async with SqliteTransport.from_url(url_for(db)) as t:
        sub = await t.subscribe("orders", "g")
        assert await sub.fetch(10, timeout=0) == []  # the delay is still running
        again = await sub.fetch(10, timeout=5)
        assert time.monotonic() - nacked_at >= 0.75
        assert ids(again) == [first.message.id]
        assert again[0].attempt == 2
        await sub.nack(again[0])  # no delay: straight back, next attempt
        third = await sub.fetch(10, timeout=1)
        assert ids(third) == [first.message.id] and third[0].attempt == 3
        await sub.ack(third)


@pytest.mark.anyio
async def test_close_returns_unacked_deliveries_at_once(db: Path) -> None:
    url = url_for(db, visibility_timeout=60)
    async with SqliteTransport.from_url(url) as a, SqliteTransport.from_url(url) as b:
        await a.publish("orders", msgs(3))
        sub_a = await a.subscribe("orders", "g")
        sub_b = await b.subscribe("orders", "g")
        got = await sub_a.fetch(3, timeout=1)
        await sub_a.ack(got[:1])

        async def close_a_soon() -> None:
            await anyio.sleep(0.2)  # b is waiting by then: it has to notice a's close
            await sub_a.close()

        async with anyio.create_task_group() as tg:
            tg.start_soon(close_a_soon)
            back = await sub_b.fetch(10, timeout=5)  # far sooner than the 60 s lease
        assert ids(back) == ids(got[1:])
        assert [d.attempt for d in back] == [2, 2]
        await sub_b.ack(back)
    assert count_rows(db, "leases") == 0


@pytest.mark.anyio
async def test_acks_are_written_by_close(db: Path) -> None:
    async with SqliteTransport.from_url(url_for(db, visibility_timeout=0.2)) as t:
        await t.publish("orders", msgs(5))
        sub = await t.subscribe("orders", "g")
        got = await sub.fetch(5, timeout=1)
        await sub.ack(got)  # buffered
    assert count_rows(db, "leases") == 0
    async with SqliteTransport.from_url(url_for(db, visibility_timeout=0.2)) as t:
        sub = await t.subscribe("orders", "g")
        assert await sub.fetch(10, timeout=0.5) == []  # would be back by now if not acked


@pytest.mark.anyio
async def test_ack_is_durable_on_return_and_concurrent_acks_share_commits(
    db: Path, transport: SqliteTransport, monkeypatch: pytest.MonkeyPatch
) -> None:
    await transport.publish("orders", msgs(101))
    sub = await transport.subscribe("orders", "g")
    got = await sub.fetch(101, timeout=1)
    await sub.ack(got[:1])
    assert count_rows(db, "leases") == 100  # written before ack() returned

    actions: list[str] = []
    transact = transport._transact

    async def counting(action: str, fn: Any) -> Any:
        actions.append(action)
        return await transact(action, fn)

    monkeypatch.setattr(transport, "_transact", counting)
    async with anyio.create_task_group() as tg:
        for d in got[1:]:  # one ack per worker task, as a concurrent consumer does
            tg.start_soon(sub.ack, [d])
    assert count_rows(db, "leases") == 0
    assert 1 <= actions.count("ack") <= 10  # group commit, not 100 fsyncs


# --- groups ----------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_every_group_gets_every_message(transport: SqliteTransport) -> None:
    sent = msgs(5)
    await transport.publish("orders", sent)
    for group in ("billing", "shipping"):
        sub = await transport.subscribe("orders", group)
        got = await sub.fetch(10, timeout=1)
        assert ids(got) == [m.id for m in sent]
        await sub.ack(got)


@pytest.mark.anyio
async def test_new_group_start_latest_or_earliest(transport: SqliteTransport) -> None:
    old = msgs(3)
    await transport.publish("orders", old)
    latest = await transport.subscribe("orders", "latest", start="latest")
    earliest = await transport.subscribe("orders", "earliest", start="earliest")
    assert await latest.fetch(10, timeout=0.1) == []
    new = msgs(1)
    await transport.publish("orders", new)
    assert ids(await latest.fetch(10, timeout=1)) == [new[0].id]
    assert ids(await earliest.fetch(10, timeout=1)) == [m.id for m in old + new]
    await latest.close()
    # An existing group resumes where it was; start only applies to a new group.
    resumed = await transport.subscribe("orders", "latest", start="earliest")
    newer = msgs(1)
    await transport.publish("orders", newer)
    assert ids(await resumed.fetch(10, timeout=1)) == [new[0].id, newer[0].id]


@pytest.mark.anyio
async def test_cleanup_keeps_what_a_group_still_needs(
    db: Path, transport: SqliteTransport, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        "herald.transports.sqlite.subscription._CLEANUP_INTERVAL", 0.0
    )  # every fetch
    await transport.publish("orders", msgs(10))
    await transport.publish("unread", msgs(4, topic="unread"))  # no group: kept
    fast = await transport.subscribe("orders", "fast")
    slow = await transport.subscribe("orders", "slow")

    await fast.ack(await fast.fetch(10, timeout=1))
    assert await fast.fetch(10, timeout=0) == []  # writes the acks, runs cleanup
    assert count_rows(db, "messages", "orders") == 10  # slow has read nothing yet

    got = await slow.fetch(10, timeout=1)
    await slow.ack(got[:3] + got[4:])  # message 4 stays leased
    assert await slow.fetch(10, timeout=0) == []
    assert count_rows(db, "messages", "orders") == 1
    assert count_rows(db, "messages", "unread") == 4

    await slow.nack(got[3])
    back = await slow.fetch(10, timeout=1)
    assert ids(back) == [got[3].message.id]  # the leased message survived cleanup
    await slow.ack(back)
    assert await slow.fetch(10, timeout=0) == []
    assert count_rows(db, "messages", "orders") == 0
    # Sequence numbers are never reused, so cursors stay valid after the log empties.
    later = msgs(2)
    await transport.publish("orders", later)
    assert ids(await fast.fetch(10, timeout=1)) == [m.id for m in later]


@pytest.mark.anyio
async def test_delete_topic_removes_only_that_topic(db: Path, transport: SqliteTransport) -> None:
    await transport.publish("orders", msgs(3))
    await transport.publish("other", msgs(2, topic="other"))
    sub = await transport.subscribe("orders", "g")
    await sub.fetch(1, timeout=1)  # leave a lease behind
    await sub.close()
    await transport.delete_topic("orders")
    assert [count_rows(db, t, "orders") for t in ("messages", "groups", "leases")] == [0, 0, 0]
    assert count_rows(db, "messages", "other") == 2
    await transport.delete_topic("never-existed")  # not an error


# --- waking up -------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_fetch_wakes_on_publish_from_this_and_other_connections(db: Path) -> None:
    async with (
        SqliteTransport.from_url(url_for(db)) as a,
        SqliteTransport.from_url(url_for(db)) as b,
    ):
        sub = await a.subscribe("orders", "g")
        for publisher in (a, b):  # b is another connection: seen by polling, not by an event
            sent = msgs(1)

            async def publish_soon(p: Transport = publisher, m: list[Message] = sent) -> None:
                await anyio.sleep(0.2)
                await p.publish("orders", m)

            async with anyio.create_task_group() as tg:
                tg.start_soon(publish_soon)
                got = await sub.fetch(10, timeout=10)
            assert ids(got) == [sent[0].id]
            await sub.ack(got)


@pytest.mark.anyio
async def test_idle_fetch_ignores_other_topics_traffic(
    db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = url_for(db)
    async with SqliteTransport.from_url(url) as quiet, SqliteTransport.from_url(url) as busy:
        assert isinstance(quiet, SqliteTransport)
        sub = await quiet.subscribe("quiet", "g")
        actions: list[str] = []
        transact = quiet._transact

        async def counting(action: str, fn: Any) -> Any:
            actions.append(action)
            return await transact(action, fn)

        monkeypatch.setattr(quiet, "_transact", counting)

        async def publish_elsewhere() -> None:
            for _ in range(40):
                await busy.publish("busy", msgs(5, topic="busy"))
                await anyio.sleep(0.01)

        async with anyio.create_task_group() as tg:
            tg.start_soon(publish_elsewhere)
            assert await sub.fetch(10, timeout=0.8) == []
        # Polls are plain reads; the write lock is taken only when there is work.
        assert actions.count("fetch") == 1


@pytest.mark.anyio
async def test_cancelled_fetch_loses_nothing(transport: SqliteTransport) -> None:
    sub = await transport.subscribe("orders", "g")
    with anyio.move_on_after(0.1):
        await sub.fetch(10, timeout=10)
    sent = msgs(3)
    await transport.publish("orders", sent)
    assert ids(await sub.fetch(10, timeout=1)) == [m.id for m in sent]


@pytest.mark.anyio
async def test_fetches_cancelled_at_any_point_lose_nothing(db: Path) -> None:
    sent = msgs(300)
    async with SqliteTransport.from_url(url_for(db, visibility_timeout=60)) as t:
        await t.publish("orders", sent)
        sub = await t.subscribe("orders", "g")
        seen: list[str] = []
        dropped = 0
        for i in range(200):  # cancel at ever later points: waiting, in the thread, after
            got: list[Delivery] = []
            handled: list[Delivery] = []
            with anyio.move_on_after(0.0002 * (i % 10)) as scope:
                got = await sub.fetch(7, timeout=1)
                await anyio.sleep(0)  # a cancel landing here drops a fetched batch unhandled
                handled = got
            dropped += bool(scope.cancelled_caught and got)
            seen += ids(handled)
            await sub.ack(handled)
        assert dropped  # the interesting case did happen
        await sub.close()  # anything leased by a cancelled fetch goes back now, not in 60 s
        sub = await t.subscribe("orders", "g")
        while got := await sub.fetch(100, timeout=0.3):
            seen += ids(got)
            await sub.ack(got)
    assert set(seen) == {m.id for m in sent}


# --- several processes -----------------------------------------------------------------------

_WORKER = textwrap.dedent(
    """
    import sys, anyio
    from herald.transports.sqlite import SqliteTransport

    async def main(url):
        async with SqliteTransport.from_url(url) as t:
            sub = await t.subscribe("orders", "workers")
            print("ready", flush=True)
            idle_rounds = 0
            while idle_rounds < 3:
                got = await sub.fetch(20, timeout=0.5)
                idle_rounds = 0 if got else idle_rounds + 1
                for d in got:
                    await anyio.sleep(0.0005)  # pretend to work, so the peers interleave
                    print(d.message.id, d.attempt, flush=True)
                await sub.ack(got)

    anyio.run(main, sys.argv[1])
    """
)

_CRASHER = textwrap.dedent(
    """
    import os, sys, anyio
    from herald.transports.sqlite import SqliteTransport

    async def main(url):
        t = SqliteTransport.from_url(url)
        await t.connect()
        sub = await t.subscribe("orders", "workers")
        got = await sub.fetch(5, timeout=5)
        print(len(got), flush=True)
        os._exit(9)  # killed: no ack, no close

    anyio.run(main, sys.argv[1])
    """
)


def _publish(url: str, batches: list[list[Message]], pause: float) -> None:
    async def run() -> None:
        async with SqliteTransport.from_url(url) as t:
            for batch in batches:
                await t.publish("orders", batch)
                await anyio.sleep(pause)

    anyio.run(run)


def test_processes_compete_in_one_group_and_lose_nothing(db: Path) -> None:
    url = url_for(db, visibility_timeout=30)
    _publish(url, [], 0)  # create the file first, so the workers do not race to create it

    async def create_group() -> None:
        async with SqliteTransport.from_url(url) as t:
            await (await t.subscribe("orders", "workers")).close()

    anyio.run(create_group)
    workers = [
        subprocess.Popen([sys.executable, "-c", _WORKER, url], stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    try:
        for w in workers:
            assert w.stdout is not None and w.stdout.readline().strip() == "ready"
        sent = [msgs(25) for _ in range(40)]
        _publish(url, sent, 0.01)
        outputs = [w.communicate(timeout=20)[0] for w in workers]
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
    assert [w.returncode for w in workers] == [0, 0]
    received = [[line.split()[0] for line in out.splitlines()] for out in outputs]
    all_sent = {m.id for batch in sent for m in batch}
    assert all(received), "both workers should have taken part"
    assert sorted(received[0] + received[1]) == sorted(all_sent)  # each exactly once
    assert count_rows(db, "leases") == 0  # every ack reached the file


def test_killed_process_leases_come_back_after_visibility_timeout(db: Path) -> None:
    url = url_for(db, visibility_timeout=0.5)
    sent = msgs(5)
    _publish(url, [sent], 0)
    crashed = subprocess.run(
        [sys.executable, "-c", _CRASHER, url], capture_output=True, text=True, timeout=20
    )
    assert crashed.returncode == 9 and crashed.stdout.strip() == "5", crashed.stderr

    async def recover() -> list[Delivery]:
        async with SqliteTransport.from_url(url) as t:
            sub = await t.subscribe("orders", "workers")
            got = await sub.fetch(10, timeout=5)
            await sub.ack(got)
            return got

    got = anyio.run(recover)
    assert ids(got) == [m.id for m in sent]
    assert {d.attempt for d in got} == {2}
