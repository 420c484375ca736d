"""The inbox stores: the InboxStore contract on every store, transactional atomicity, concurrent
claims, and ``subscriber(dedupe=...)`` end to end.

PostgreSQL and Redis tests use the real servers (``HERALD_TEST_POSTGRES_DSN``, default
``postgresql://postgres@127.0.0.1:5432/test``; ``HERALD_TEST_REDIS_URL``, default
``redis://127.0.0.1:6379/0``). An unreachable server skips them locally and fails them under CI
(``CI=true``). Every test uses its own table / key prefix and removes it afterwards.
"""

from __future__ import annotations

import os
import socket
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import anyio
import pydantic
import pytest

from herald import App, Context, Retry
from herald.inbox import InboxStore, MemoryInbox
from herald.inbox.sqlite import SqliteInbox
from herald.message import new_id
from herald.middleware.dedupe import Dedupe
from herald.transports import TransportError

from .conftest import topic, wait_until

pytestmark = pytest.mark.anyio

POSTGRES_DSN = os.environ.get(
    "HERALD_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test"
)
REDIS_URL = os.environ.get("HERALD_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")

StoreFactory = Callable[..., InboxStore]


class OrderPlaced(pydantic.BaseModel):
    order_id: str


def unique(name: str) -> str:
    return f"{name}_{new_id()[-12:].lower()}"


# --- servers ------------------------------------------------------------------------------------

_reachable: dict[str, bool] = {}


def require_server(kind: str, url: str) -> None:
    """Skip the test if the server of ``url`` does not accept connections; fail it under CI."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or {"postgres": 5432}.get(kind, 6379)
    where = f"{host}:{port}"
    if where not in _reachable:
        try:
            socket.create_connection((host, port), timeout=2).close()
            _reachable[where] = True
        except OSError:
            _reachable[where] = False
    if not _reachable[where]:
        message = f"{kind} not reachable at {where}"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{message} (CI=true: the server must be running)")
        pytest.skip(message)


def _drop_postgres_table(table: str) -> None:
    import psycopg

    with psycopg.connect(POSTGRES_DSN, autocommit=True) as conn:
        conn.execute(f'DROP TABLE IF EXISTS "{table}"')


def _delete_redis_keys(prefix: str) -> None:
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    try:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@pytest.fixture
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreFactory]:
    """``make_store(kind, retention=...)``: a fresh, unopened store with its own table,
    file or key prefix, removed after the test."""
    cleanups: list[Callable[[], None]] = []

    def make(kind: str, **kw: Any) -> InboxStore:
        if kind == "memory":
            return MemoryInbox(**kw)
        if kind == "sqlite":
            return SqliteInbox(str(tmp_path / f"{unique('inbox')}.db"), **kw)
        if kind == "postgres":
            require_server("postgres", POSTGRES_DSN)
            from herald.inbox.postgres import PostgresInbox

            table = unique("herald_inbox_test")
            cleanups.append(lambda: _drop_postgres_table(table))
            return PostgresInbox(POSTGRES_DSN, table=table, **kw)
        if kind == "redis":
            require_server("redis", REDIS_URL)
            from herald.inbox.redis import RedisInbox

            prefix = f"herald-test:{unique('inbox')}"
            cleanups.append(lambda: _delete_redis_keys(prefix))
            return RedisInbox(REDIS_URL, prefix=prefix, **kw)
        raise AssertionError(kind)

    yield make
    for cleanup in cleanups:
        cleanup()


ALL_STORES = ["memory", "sqlite", "postgres", "redis"]


# --- the contract, on every store --------------------------------------------------------------


@pytest.mark.parametrize("kind", ALL_STORES)
async def test_contract(kind: str, make_store: StoreFactory) -> None:
    store = make_store(kind)
    await store.open()
    await store.open()  # once per user: must be idempotent
    try:
        assert not await store.seen("g", "k1")
        await store.record("g", ["k1", "k2"])
        assert await store.seen("g", "k1")
        assert await store.seen("g", "k2")
        await store.record("g", ["k1", "k3"])  # recording twice is fine
        await store.record("g", [])
        assert await store.seen("g", "k3")

        # groups are isolated, also when names contain the separator a store might use
        assert not await store.seen("other", "k1")
        await store.record("a:b", ["c"])
        assert not await store.seen("a", "b:c")
        assert await store.seen("a:b", "c")

        # transaction: a handle for a new key, None once it is recorded
        async with store.transaction("g", "t1") as tx:
            assert tx is not None
        assert await store.seen("g", "t1")
        async with store.transaction("g", "t1") as tx:
            assert tx is None
        async with store.transaction("g", "k1") as tx:  # recorded by record()
            assert tx is None
        await store.record("g", ["t1"])  # a key claimed by a transaction may be recorded again

        # an exception rolls the claim back: the key stays new
        with pytest.raises(RuntimeError, match="boom"):
            async with store.transaction("g", "t2") as tx:
                assert tx is not None
                raise RuntimeError("boom")
        assert not await store.seen("g", "t2")
        async with store.transaction("g", "t2") as tx:
            assert tx is not None
        assert await store.seen("g", "t2")
    finally:
        await store.close()
        await store.close()
        await store.close()  # more closes than opens: harmless


@pytest.mark.parametrize("kind", ALL_STORES)
async def test_purge_removes_records_older_than_retention(
    kind: str, make_store: StoreFactory
) -> None:
    store = make_store(kind, retention=0.3)
    await store.open()
    try:
        await store.record("g", ["old1", "old2"])
        await anyio.sleep(0.6)
        await store.record("g", ["new"])
        purged = await store.purge()
        # Redis expires records itself and reports nothing purged
        assert purged == (0 if kind == "redis" else 2)
        assert not await store.seen("g", "old1")
        assert not await store.seen("g", "old2")
        assert await store.seen("g", "new")
        assert await store.purge() == 0
    finally:
        await store.close()


@pytest.mark.parametrize("kind", ["sqlite", "postgres", "redis"])
async def test_open_is_counted_per_user_and_store_reopens(
    kind: str, make_store: StoreFactory
) -> None:
    store = make_store(kind)
    await store.open()
    await store.open()
    await store.record("g", ["k"])
    await store.close()  # one of two users left: still open for the other
    assert await store.seen("g", "k")
    await store.close()
    with pytest.raises(TransportError, match="not open"):
        await store.seen("g", "k")
    await store.open()  # open again after the last close
    try:
        assert await store.seen("g", "k")  # and the records are durable
    finally:
        await store.close()


async def test_two_sqlite_stores_share_one_file(tmp_path: Path) -> None:
    path = str(tmp_path / "shared.db")
    a, b = SqliteInbox(path), SqliteInbox(path)
    async with anyio.create_task_group() as tg:  # concurrent creation of the schema
        tg.start_soon(a.open)
        tg.start_soon(b.open)
    try:
        assert not await b.seen("g", "k")
        await a.record("g", ["k"])  # another connection's record, committed after b looked
        assert await b.seen("g", "k")
        async with b.transaction("g", "k") as tx:
            assert tx is None
    finally:
        await a.close()
        await b.close()


# --- transactional atomicity --------------------------------------------------------------------


async def test_sqlite_transaction_commits_handler_writes_with_the_record(tmp_path: Path) -> None:
    path = str(tmp_path / "app.db")
    with sqlite3.connect(path) as setup:
        setup.execute("CREATE TABLE orders (id TEXT PRIMARY KEY)")
    setup.close()
    store = SqliteInbox(path)
    await store.open()

    def rows() -> list[str]:
        with sqlite3.connect(path) as conn:
            return [r[0] for r in conn.execute("SELECT id FROM orders ORDER BY id")]

    try:
        with pytest.raises(RuntimeError):
            async with store.transaction("g", "m1") as conn:
                assert isinstance(conn, sqlite3.Connection)
                conn.execute("INSERT INTO orders VALUES ('m1')")
                raise RuntimeError("handler failed after writing")
        assert rows() == []
        assert not await store.seen("g", "m1")

        async with store.transaction("g", "m1") as conn:
            assert conn is not None
            conn.execute("INSERT INTO orders VALUES ('m1')")
        assert rows() == ["m1"]
        assert await store.seen("g", "m1")
    finally:
        await store.close()


async def test_sqlite_transaction_rolls_back_on_cancellation(tmp_path: Path) -> None:
    path = str(tmp_path / "app.db")
    with sqlite3.connect(path) as setup:
        setup.execute("CREATE TABLE orders (id TEXT PRIMARY KEY)")
    setup.close()
    store = SqliteInbox(path)
    await store.open()
    try:
        with anyio.move_on_after(0.1):
            async with store.transaction("g", "m1") as conn:
                assert conn is not None
                conn.execute("INSERT INTO orders VALUES ('m1')")
                await anyio.sleep(5)
        assert not await store.seen("g", "m1")
        await store.record("g", ["m2"])  # the writer is usable again (not left in a transaction)
        assert await store.seen("g", "m2")
        with sqlite3.connect(path) as check:
            assert check.execute("SELECT count(*) FROM orders").fetchone()[0] == 0
        check.close()
    finally:
        await store.close()


async def test_postgres_transaction_commits_handler_writes_with_the_record(
    make_store: StoreFactory,
) -> None:
    import psycopg

    store = make_store("postgres")
    orders = unique("orders_test")
    with psycopg.connect(POSTGRES_DSN, autocommit=True) as setup:
        setup.execute(f'CREATE TABLE "{orders}" (id text PRIMARY KEY)')

    def rows() -> list[str]:
        with psycopg.connect(POSTGRES_DSN, autocommit=True) as conn:
            return [r[0] for r in conn.execute(f'SELECT id FROM "{orders}" ORDER BY id')]

    await store.open()
    try:
        with pytest.raises(RuntimeError):
            async with store.transaction("g", "m1") as conn:
                assert isinstance(conn, psycopg.AsyncConnection)
                await conn.execute(f'INSERT INTO "{orders}" VALUES (%s)', ("m1",))
                raise RuntimeError("handler failed after writing")
        assert rows() == []
        assert not await store.seen("g", "m1")

        async with store.transaction("g", "m1") as conn:
            assert conn is not None
            await conn.execute(f'INSERT INTO "{orders}" VALUES (%s)', ("m1",))
        assert rows() == ["m1"]
        assert await store.seen("g", "m1")
    finally:
        await store.close()
        _drop_postgres_table(orders)


# --- concurrent claims --------------------------------------------------------------------------


@pytest.mark.parametrize("first_fails", [False, True])
async def test_postgres_concurrent_claims_of_one_key(
    make_store: StoreFactory, first_fails: bool
) -> None:
    """The second claim waits for the first transaction: after its commit it sees a duplicate,
    after its rollback it claims the key itself."""
    store = make_store("postgres")
    await store.open()
    handles: dict[str, bool] = {}
    first_in = anyio.Event()

    async def first() -> None:
        try:
            async with store.transaction("g", "k") as tx:
                handles["first"] = tx is not None
                first_in.set()
                await anyio.sleep(0.3)  # the second claim runs (and must wait) meanwhile
                if first_fails:
                    raise RuntimeError("first handler failed")
        except RuntimeError:
            pass

    async def second() -> None:
        await first_in.wait()
        async with store.transaction("g", "k") as tx:
            handles["second"] = tx is not None

    try:
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(first)
                tg.start_soon(second)
        assert handles == {"first": True, "second": first_fails}
    finally:
        await store.close()


async def test_postgres_many_concurrent_claims_yield_one_handle(make_store: StoreFactory) -> None:
    store = make_store("postgres")
    await store.open()
    claimed = 0

    async def claim() -> None:
        nonlocal claimed
        async with store.transaction("g", "same") as tx:
            if tx is not None:
                claimed += 1
                await anyio.sleep(0.05)

    try:
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                for _ in range(8):
                    tg.start_soon(claim)
        assert claimed == 1
    finally:
        await store.close()


# --- errors -------------------------------------------------------------------------------------


async def test_unreachable_redis_is_a_transport_error() -> None:
    from herald.inbox.redis import RedisInbox

    store = RedisInbox("redis://:secret@127.0.0.1:1/0", connect_timeout=2)
    with pytest.raises(TransportError) as info:
        await store.open()
    assert "127.0.0.1:1" in str(info.value)
    assert "secret" not in str(info.value)
    assert "secret" not in repr(store)


async def test_unreachable_postgres_is_a_transport_error() -> None:
    from herald.inbox.postgres import PostgresInbox

    store = PostgresInbox("postgresql://u:secret@127.0.0.1:1/x", connect_timeout=2)
    with pytest.raises(TransportError) as info:
        await store.open()
    assert "127.0.0.1:1" in str(info.value)
    assert "secret" not in str(info.value)
    assert "secret" not in repr(store)


async def test_postgres_keyword_dsn_password_is_redacted() -> None:
    from herald.inbox.postgres import PostgresInbox, redact_dsn

    dsn = "host=127.0.0.1 port=1 user=u password=secret dbname=x"
    assert "secret" not in redact_dsn(dsn)
    with pytest.raises(TransportError) as info:
        await PostgresInbox(dsn, connect_timeout=2).open()
    assert "secret" not in str(info.value)


async def test_postgres_refuses_a_bad_table_name() -> None:
    from herald.inbox.postgres import PostgresInbox

    with pytest.raises(ValueError, match="table name"):
        PostgresInbox(POSTGRES_DSN, table='x"; DROP TABLE y; --')


async def test_sqlite_inbox_in_a_missing_directory_is_a_transport_error(tmp_path: Path) -> None:
    store = SqliteInbox(str(tmp_path / "nope" / "inbox.db"))
    with pytest.raises(TransportError, match="does not exist"):
        await store.open()


async def test_sqlite_inbox_on_an_unwritable_file_is_a_transport_error(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root can write read-only files")
    path = tmp_path / "ro.db"
    path.write_bytes(b"")
    path.chmod(0o444)
    with pytest.raises(TransportError, match=r"ro\.db"):
        await SqliteInbox(str(path)).open()


async def test_sqlite_inbox_on_a_directory_is_a_transport_error(tmp_path: Path) -> None:
    with pytest.raises(TransportError, match="unable to open"):
        await SqliteInbox(str(tmp_path)).open()


async def test_sqlite_inbox_on_a_file_that_is_not_a_database(tmp_path: Path) -> None:
    path = tmp_path / "junk.db"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(TransportError, match="not a SQLite database"):
        await SqliteInbox(str(path)).open()


def test_sqlite_inbox_refuses_memory_path() -> None:
    with pytest.raises(ValueError):
        SqliteInbox(":memory:")


# --- App: subscriber(dedupe=...) ----------------------------------------------------------------


def dedupes(app: App) -> list[Dedupe]:
    """The per-group Dedupe instances of a running app (they count ``duplicates``)."""
    return [m for c in app.consumers for m in c.chain if isinstance(m, Dedupe)]


async def _publish_twice_and_count(app: App, t: str, calls: list[str]) -> int:
    """Publish a message, wait for it, publish the same Message again, wait for the
    duplicate; then one more message to show the group goes on. Returns the duplicates."""
    async with app:
        (dedupe,) = dedupes(app)
        msg = app.message(t, OrderPlaced(order_id="1"))
        await app.transport.publish(t, [msg])
        await wait_until(lambda: len(calls) == 1)
        await app.transport.publish(t, [msg])  # the same id: a redelivered duplicate
        await wait_until(lambda: dedupe.duplicates == 1)
        await app.publish(t, OrderPlaced(order_id="2"))
        await wait_until(lambda: len(calls) == 2)
        return dedupe.duplicates


def app_for(broker_url: str, tmp_path: Path) -> App:
    """An app whose ``dedupe=True`` works on any broker: memory and sqlite have a default
    inbox; the others (which have none) get an SqliteInbox."""
    default = broker_url.startswith(("memory:", "sqlite:"))
    inbox = None if default else SqliteInbox(str(tmp_path / "inbox.db"))
    return App("svc", broker=broker_url, inbox=inbox)


def skip_if_broker_dedupes(app: App) -> None:
    if app.transport.features.dedupes_by_id:
        pytest.skip("the broker itself drops a re-published id, so no duplicate reaches the inbox")


async def test_app_dedupe_runs_handler_once(broker_url: str, tmp_path: Path) -> None:
    t = topic()
    app = app_for(broker_url, tmp_path)
    skip_if_broker_dedupes(app)
    calls: list[str] = []

    @app.subscriber(t, dedupe=True)
    async def handle(e: OrderPlaced) -> None:
        calls.append(e.order_id)

    assert await _publish_twice_and_count(app, t, calls) == 1
    assert calls == ["1", "2"]
    if broker_url.startswith("sqlite"):
        assert isinstance(app.inbox, SqliteInbox)
        assert app.inbox.path == broker_url.removeprefix("sqlite:///") + ".inbox.db"
        assert os.path.exists(app.inbox.path)


async def test_app_dedupe_duplicates_in_one_batch(broker_url: str, tmp_path: Path) -> None:
    t = topic()
    app = app_for(broker_url, tmp_path)
    skip_if_broker_dedupes(app)
    calls: list[str] = []

    @app.subscriber(t, dedupe=True)
    async def handle(e: OrderPlaced) -> None:
        calls.append(e.order_id)

    msgs = [app.message(t, OrderPlaced(order_id=str(i))) for i in range(20)]
    await app.transport.connect()
    if not app.transport.features.replay:  # the group must exist to keep what comes first
        await (await app.transport.subscribe(t, app.name)).close()
    await app.transport.publish(t, msgs + msgs[:10])  # published before the consumer starts
    async with app:
        (dedupe,) = dedupes(app)
        await wait_until(lambda: len(calls) == 20 and dedupe.duplicates == 10)
    assert sorted(calls, key=int) == [str(i) for i in range(20)]


async def test_app_dedupe_remembers_across_restarts(sqlite_url: str) -> None:
    t = topic()
    calls: list[str] = []

    def make_app() -> App:
        app = App("svc", broker=sqlite_url)

        @app.subscriber(t, dedupe=True)
        async def handle(e: OrderPlaced) -> None:
            calls.append(e.order_id)

        return app

    first = make_app()
    msg = first.message(t, OrderPlaced(order_id="1"))
    async with first:
        await first.transport.publish(t, [msg])
        await wait_until(lambda: calls == ["1"])
    second = make_app()
    async with second:
        (dedupe,) = dedupes(second)
        await second.transport.publish(t, [msg])
        await wait_until(lambda: dedupe.duplicates == 1)
    assert calls == ["1"]


@pytest.mark.parametrize("kind", ["postgres", "redis"])
async def test_app_dedupe_with_server_store(
    kind: str, sqlite_url: str, make_store: StoreFactory
) -> None:
    t = topic()
    app = App("svc", broker=sqlite_url)
    calls: list[str] = []

    @app.subscriber(t, dedupe=make_store(kind))
    async def handle(e: OrderPlaced) -> None:
        calls.append(e.order_id)

    assert await _publish_twice_and_count(app, t, calls) == 1
    assert calls == ["1", "2"]


def _orders_db(path: Path) -> None:
    with sqlite3.connect(path) as setup:
        setup.execute("CREATE TABLE orders (order_id TEXT, msg_id TEXT)")
    setup.close()


def _order_counts(path: Path) -> dict[str, int]:
    with sqlite3.connect(path) as conn:
        rows = conn.execute("SELECT order_id, count(*) FROM orders GROUP BY order_id").fetchall()
    conn.close()
    return {order_id: n for order_id, n in rows}


async def test_app_transactional_dedupe_on_sqlite(sqlite_url: str, tmp_path: Path) -> None:
    t = topic()
    path = tmp_path / "app.db"
    _orders_db(path)
    app = App("svc", broker=sqlite_url)
    calls = 0

    @app.subscriber(t, dedupe=Dedupe(SqliteInbox(str(path)), transactional=True))
    async def handle(e: OrderPlaced, ctx: Context) -> None:
        nonlocal calls
        assert isinstance(ctx.transaction, sqlite3.Connection)
        ctx.transaction.execute("INSERT INTO orders VALUES (?, ?)", (e.order_id, ctx.message.id))
        calls += 1

    async with app:
        (dedupe,) = dedupes(app)
        msgs = [app.message(t, OrderPlaced(order_id=str(i))) for i in range(5)]
        await app.transport.publish(t, msgs)
        await wait_until(lambda: calls == 5)
        await app.transport.publish(t, msgs[:3])  # redelivered duplicates
        await wait_until(lambda: dedupe.duplicates == 3)
    assert calls == 5
    assert _order_counts(path) == {str(i): 1 for i in range(5)}


async def test_app_transactional_dedupe_rolls_back_a_failed_delivery(
    sqlite_url: str, tmp_path: Path
) -> None:
    """A handler that writes and then fails: its write is rolled back with the claim and the
    redelivery writes again, so exactly one row remains."""
    t = topic()
    path = tmp_path / "app.db"
    _orders_db(path)
    # no in-process retries: each attempt is a delivery of its own
    app = App(
        "svc",
        broker=sqlite_url,
        retry=Retry(attempts=1, deliveries=3, redelivery_delay=0.01, factor=1.0),
    )
    attempts = 0

    @app.subscriber(t, dedupe=Dedupe(SqliteInbox(str(path)), transactional=True))
    async def handle(e: OrderPlaced, ctx: Context) -> None:
        nonlocal attempts
        attempts += 1
        ctx.transaction.execute("INSERT INTO orders VALUES (?, ?)", (e.order_id, ctx.message.id))
        if attempts == 1:
            raise RuntimeError("fails after writing, once")

    async with app:
        await app.publish(t, OrderPlaced(order_id="1"))
        await wait_until(lambda: attempts == 2)
        await wait_until(lambda: app.consumers[0].stats.handled == 1)
    assert _order_counts(path) == {"1": 1}


async def test_app_transactional_dedupe_with_in_process_retries(
    sqlite_url: str, tmp_path: Path
) -> None:
    """In-process retries run outside the transaction: each attempt gets a fresh one."""
    t = topic()
    path = tmp_path / "app.db"
    _orders_db(path)
    app = App("svc", broker=sqlite_url, retry=Retry(attempts=3, delay=0.001, factor=1.0))
    attempts = 0

    @app.subscriber(t, dedupe=Dedupe(SqliteInbox(str(path)), transactional=True))
    async def handle(e: OrderPlaced, ctx: Context) -> None:
        nonlocal attempts
        attempts += 1
        ctx.transaction.execute("INSERT INTO orders VALUES (?, ?)", (e.order_id, ctx.message.id))
        if attempts == 1:
            raise RuntimeError("fails after writing, once")

    async with app:
        await app.publish(t, OrderPlaced(order_id="1"))
        await wait_until(lambda: attempts == 2)
        await wait_until(lambda: app.consumers[0].stats.handled == 1)
    assert _order_counts(path) == {"1": 1}
