"""Event sourcing and CQRS: a bank account that stores what happened, not the balance.

* ``Account`` is an aggregate: its balance is rebuilt by replaying ``AccountOpened``,
  ``MoneyDeposited`` and ``MoneyWithdrawn`` from the event store (SQLite, in the broker's file).
* Commands (``OpenAccount``, ``Deposit``, ``Withdraw``) have one handler each and answer the
  sender: the new balance, or a rejection ("insufficient funds").
* Saved events are published on the bus (topic ``account``) by the store's relay; two
  projections turn them into read models — ``balances`` and a ``statement`` — in their own
  database, exactly once. Queries read those tables directly.
* Two clerks change one account at once: one wins, the other gets a ConcurrencyError, reloads
  and retries.
* Time travel: the account as it was yesterday.

Run it::

    python examples/bank_account.py [DATA_DIR]           # a scripted day at the bank
    herald run examples.bank_account:app                  # the same service as a worker
                                                          # (BANK_DATA=DIR for its files)
"""

from __future__ import annotations

import os
import sys
import time
from datetime import UTC, datetime, timedelta

import anyio
import msgspec

from herald import App
from herald.eventsourcing import (
    Aggregate,
    Commands,
    ConcurrencyError,
    EventStore,
    Rejected,
    Repository,
    Tx,
    projection,
)

# --- events (what happened) and commands (what is asked) ----------------------------------


class AccountOpened(msgspec.Struct, frozen=True):
    owner: str


class MoneyDeposited(msgspec.Struct, frozen=True):
    amount: int


class MoneyWithdrawn(msgspec.Struct, frozen=True):
    amount: int


class OpenAccount(msgspec.Struct, frozen=True):
    account: str
    owner: str


class Deposit(msgspec.Struct, frozen=True):
    account: str
    amount: int


class Withdraw(msgspec.Struct, frozen=True):
    account: str
    amount: int


# --- the aggregate ------------------------------------------------------------------------


class Account(Aggregate):
    snapshot_every = 50  # loading a busy account replays at most 49 events
    owner: str = ""
    balance: int = 0

    def open(self, owner: str) -> None:
        if self.version:
            raise Rejected(f"account {self.id} is already open")
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


# --- the service --------------------------------------------------------------------------


class Clock:
    """The store's clock, set back a day in the script so there is a "yesterday"."""

    offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


DATA = (
    sys.argv[1]
    if __name__ == "__main__" and len(sys.argv) > 1
    else os.environ.get("BANK_DATA", ".")
)
BROKER = f"sqlite:///{os.path.join(DATA, 'bank.db')}"
READ_DB = f"sqlite:///{os.path.join(DATA, 'bank_read.db')}"
clock = Clock()
app = App("bank", broker=BROKER)
store = EventStore(BROKER, clock=clock)  # the store shares the broker's file
accounts = Repository(Account, store, app=app, topic="account")
commands = Commands(app, "bank.commands")


@commands.handler
async def open_account(cmd: OpenAccount) -> int:
    acc = await accounts.update(cmd.account, lambda a: a.open(cmd.owner), create=True)
    return acc.balance


@commands.handler
async def deposit(cmd: Deposit) -> int:
    return (await accounts.update(cmd.account, lambda a: a.deposit(cmd.amount))).balance


@commands.handler
async def withdraw(cmd: Withdraw) -> int:
    return (await accounts.update(cmd.account, lambda a: a.withdraw(cmd.amount))).balance


@projection(app, store, db=READ_DB, topics=["account"])
class Balances:
    """Read model: one row per account with its current balance."""

    tables = ("balances",)

    async def setup(self, tx: Tx) -> None:
        await tx.execute(
            "CREATE TABLE IF NOT EXISTS balances (account TEXT PRIMARY KEY, owner TEXT,"
            " balance INTEGER NOT NULL)"
        )

    async def on_opened(self, e: AccountOpened, tx: Tx) -> None:
        assert tx.recorded is not None
        await tx.execute("INSERT INTO balances VALUES (?, ?, 0)", (tx.recorded.stream, e.owner))

    async def on_moved(self, e: MoneyDeposited | MoneyWithdrawn, tx: Tx) -> None:
        assert tx.recorded is not None
        delta = e.amount if isinstance(e, MoneyDeposited) else -e.amount
        await tx.execute(
            "UPDATE balances SET balance = balance + ? WHERE account = ?",
            (delta, tx.recorded.stream),
        )


@projection(app, store, db=READ_DB, topics=["account"])
class Statement:
    """Read model: the account statement, one line per movement."""

    tables = ("statement",)

    async def setup(self, tx: Tx) -> None:
        await tx.execute(
            "CREATE TABLE IF NOT EXISTS statement (account TEXT, version INTEGER, at REAL,"
            " amount INTEGER, PRIMARY KEY (account, version))"
        )

    async def on_moved(self, e: MoneyDeposited | MoneyWithdrawn, tx: Tx) -> None:
        rec = tx.recorded
        assert rec is not None
        delta = e.amount if isinstance(e, MoneyDeposited) else -e.amount
        await tx.execute(
            "INSERT INTO statement VALUES (?, ?, ?, ?)",
            (rec.stream, rec.version, rec.recorded_at, delta),
        )


# --- queries read the read models directly ------------------------------------------------


async def balance_of(account: str) -> int | None:
    row = await Balances.db.fetchone("SELECT balance FROM balances WHERE account = ?", (account,))
    return None if row is None else int(row[0])


async def statement_of(account: str) -> list[tuple[str, int]]:
    rows = await Statement.db.fetch(
        "SELECT at, amount FROM statement WHERE account = ? ORDER BY version", (account,)
    )
    return [(datetime.fromtimestamp(at, UTC).strftime("%a %H:%M"), amt) for at, amt in rows]


# --- a scripted day -----------------------------------------------------------------------


async def caught_up() -> None:
    with anyio.fail_after(30):
        for p in (Balances, Statement):
            while (await p.status()).lag:
                await anyio.sleep(0.02)


async def main() -> None:
    acc = f"acc-{int(time.time() * 1000) % 100000}"
    async with app:
        clock.offset = -86400.0  # yesterday
        await commands.send(OpenAccount(acc, "Ada"), key=acc)
        print(f"opened {acc} for Ada (yesterday)")
        print(f"deposit 100 -> balance {await commands.send(Deposit(acc, 100), key=acc)}")
        clock.offset = 0.0  # today
        print(f"deposit 50 -> balance {await commands.send(Deposit(acc, 50), key=acc)}")
        print(f"withdraw 30 -> balance {await commands.send(Withdraw(acc, 30), key=acc)}")
        try:
            await commands.send(Withdraw(acc, 500), key=acc)
        except Rejected as e:
            print(f"withdraw 500 -> rejected: {e}")

        # two clerks load the account at the same version and both change it
        clerk_a, clerk_b = await accounts.get(acc), await accounts.get(acc)
        clerk_a.deposit(5)
        clerk_b.withdraw(20)
        await accounts.save(clerk_a)
        try:
            await accounts.save(clerk_b)
        except ConcurrencyError as e:
            print(f"conflict: {e}")
        resolved = await accounts.update(acc, lambda a: a.withdraw(20))  # reload and retry
        print(f"resolved: clerk B's withdrawal applied on version {resolved.version - 1}, "
              f"balance {resolved.balance}")  # fmt: skip

        await caught_up()
        print(f"read model: balance {await balance_of(acc)}")
        print("statement:", ", ".join(f"{d} {amt:+d}" for d, amt in await statement_of(acc)))
        yesterday = datetime.now(UTC) - timedelta(hours=12)
        then = await accounts.get(acc, at=yesterday)
        print(f"as of yesterday: balance {then.balance} (version {then.version})")
        now = await accounts.get(acc)
        print(f"today: balance {now.balance} (version {now.version}), "
              f"{(await Balances.status()).position} events projected")  # fmt: skip


if __name__ == "__main__":
    anyio.run(main)
