"""Shared pieces of the event-sourcing tests: a store URL per database, a bank account."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from herald.eventsourcing import Aggregate, ReadModel, Rejected, Tx
from herald.message import new_id
from herald.testing.servers import require_server

POSTGRES_DSN = os.environ.get(
    "HERALD_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test"
)
DATABASES = ["sqlite", "postgres"]


def unique_prefix(name: str = "es") -> str:
    return f"{name}_{new_id()[-12:].lower()}"


def drop_postgres(prefix: str) -> None:
    """Drop every table and sequence a test created under ``prefix``."""
    import psycopg

    with psycopg.connect(POSTGRES_DSN, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT relname, relkind FROM pg_class WHERE relname LIKE %s AND relkind IN ('r','S')",
            (prefix + "%",),
        ).fetchall()
        for name, kind in rows:
            what = "TABLE" if kind == "r" else "SEQUENCE"
            conn.execute(f'DROP {what} IF EXISTS "{name}" CASCADE')


def database_url(kind: str, tmp_path: Path, file: str = "store.db") -> str:
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / file}"
    require_server("postgres")
    return POSTGRES_DSN


@pytest.fixture(params=DATABASES, name="db")
def db_fixture(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """(URL, table prefix) of a fresh event store on SQLite and on PostgreSQL."""
    url = database_url(request.param, tmp_path)
    prefix = unique_prefix()
    yield url, prefix
    if request.param == "postgres":
        drop_postgres(prefix)


class AccountOpened(msgspec.Struct):
    owner: str


class MoneyDeposited(msgspec.Struct):
    amount: int


class MoneyWithdrawn(msgspec.Struct):
    amount: int


class Account(Aggregate):
    owner: str = ""
    balance: int = 0

    def open(self, owner: str) -> None:
        self.record(AccountOpened(owner=owner))

    def deposit(self, amount: int) -> None:
        if amount <= 0:
            raise Rejected("amount must be positive")
        self.record(MoneyDeposited(amount=amount))

    def withdraw(self, amount: int) -> None:
        if amount > self.balance:
            raise Rejected(f"insufficient funds: balance {self.balance}, asked {amount}")
        self.record(MoneyWithdrawn(amount=amount))

    def on_opened(self, e: AccountOpened) -> None:
        self.owner = e.owner

    def on_deposited(self, e: MoneyDeposited) -> None:
        self.balance += e.amount

    def on_withdrawn(self, e: MoneyWithdrawn) -> None:
        self.balance -= e.amount


class BankViews:
    """Balances and a statement (no unique key: a double-applied event would show twice)."""

    tables = ("es_test_balances", "es_test_statement")
    #: SIGKILL this process when this many events have been applied (crash tests)
    kill_at: int | None = None
    fail_on_amount: int | None = None
    applied = 0

    async def setup(self, tx: Tx) -> None:
        await tx.execute(
            "CREATE TABLE IF NOT EXISTS es_test_balances (id TEXT PRIMARY KEY, owner TEXT,"
            " balance BIGINT NOT NULL)"
        )
        await tx.execute(
            "CREATE TABLE IF NOT EXISTS es_test_statement (id TEXT NOT NULL,"
            " version INTEGER NOT NULL, amount BIGINT NOT NULL)"
        )

    def _tick(self) -> None:
        type(self).applied += 1
        if self.kill_at is not None and self.applied >= self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    async def on_opened(self, e: AccountOpened, tx: Tx) -> None:
        assert tx.recorded is not None
        await tx.execute(
            "INSERT INTO es_test_balances (id, owner, balance) VALUES (?, ?, 0)",
            (tx.recorded.stream, e.owner),
        )
        self._tick()

    async def on_moved(self, e: MoneyDeposited | MoneyWithdrawn, tx: Tx) -> None:
        assert tx.recorded is not None
        if e.amount == self.fail_on_amount:
            raise RuntimeError(f"cannot project amount {e.amount}")
        amount = e.amount if isinstance(e, MoneyDeposited) else -e.amount
        stream = tx.recorded.stream
        await tx.execute(
            "UPDATE es_test_balances SET balance = balance + ? WHERE id = ?", (amount, stream)
        )
        await tx.execute(
            "INSERT INTO es_test_statement (id, version, amount) VALUES (?, ?, ?)",
            (stream, tx.recorded.version, amount),
        )
        self._tick()


async def read_views(db: ReadModel) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    balances = await db.fetch("SELECT id, owner, balance FROM es_test_balances ORDER BY id")
    statement = await db.fetch(
        "SELECT id, version, amount FROM es_test_statement ORDER BY id, version"
    )
    return balances, statement


def read_model_url(kind: str, tmp_path: Path, name: str) -> str:
    """A fresh read-model database: an SQLite file, or a PostgreSQL schema of its own."""
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / (name + '.db')}"
    import psycopg

    require_server("postgres")
    schema = unique_prefix(name)
    with psycopg.connect(POSTGRES_DSN, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    return f"{POSTGRES_DSN}?options=-csearch_path%3D{schema}"


def drop_read_model(url: str) -> None:
    if "search_path%3D" not in url:
        return
    import psycopg

    schema = url.rsplit("%3D", 1)[1]
    with psycopg.connect(POSTGRES_DSN, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
