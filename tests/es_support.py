"""Shared pieces of the event-sourcing tests: a store URL per database, a bank account."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from herald.eventsourcing import Aggregate, Rejected
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
