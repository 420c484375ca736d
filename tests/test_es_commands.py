"""CQRS commands: one handler per command type, a result or a clear rejection back to the
sender, causation into the stored events; the reply path on its own."""

from __future__ import annotations

from pathlib import Path

import anyio
import msgspec
import pytest

from herald import App, Context
from herald.eventsourcing import Commands, EventStore, Rejected, Repository
from herald.eventsourcing.replies import Replies, reply

from .conftest import topic
from .es_support import Account

pytestmark = pytest.mark.anyio


class OpenAccount(msgspec.Struct):
    account: str
    owner: str


class Withdraw(msgspec.Struct):
    account: str
    amount: int


class Balance(msgspec.Struct):
    account: str
    balance: int


async def test_commands_reply_with_a_result_or_a_rejection(tmp_path: Path) -> None:
    app = App("bank", broker=f"sqlite:///{tmp_path / 'b.db'}")
    store = EventStore(f"sqlite:///{tmp_path / 'es.db'}")
    accounts = Repository(Account, store, app=app)
    commands = Commands(app, "bank.commands")

    @commands.handler
    async def open_account(cmd: OpenAccount) -> Balance:
        def open_with_bonus(a: Account) -> None:
            a.open(cmd.owner)
            a.deposit(10)

        acc = await accounts.update(cmd.account, open_with_bonus, create=True)
        return Balance(account=acc.id, balance=acc.balance)

    @commands.handler
    async def withdraw(cmd: Withdraw, ctx: Context) -> Balance:
        acc = await accounts.update(cmd.account, lambda a: a.withdraw(cmd.amount))
        return Balance(account=acc.id, balance=acc.balance)

    async with app:
        opened = await commands.send(OpenAccount("acc-1", "ada"), key="acc-1", returns=Balance)
        assert opened == Balance("acc-1", 10)
        left = await commands.send(Withdraw("acc-1", 4), key="acc-1", returns=Balance)
        assert left.balance == 6
        with pytest.raises(Rejected, match="insufficient funds: balance 6, asked 50"):
            await commands.send(Withdraw("acc-1", 50), key="acc-1")
        # concurrent senders each get their own answer
        results: list[int] = []

        async def one(n: int) -> None:
            results.append((await commands.send(Withdraw("acc-1", 1), returns=Balance)).balance)

        async with anyio.create_task_group() as tg:
            for n in range(5):
                tg.start_soon(one, n)
        assert sorted(results) == [1, 2, 3, 4, 5]
        async with store:
            recs = await store.read("acc-1")
    # the events of a command carry its correlation id and have it as their cause
    withdrawn = recs[2]
    assert withdrawn.type == "MoneyWithdrawn"
    assert withdrawn.headers["causation_id"] != withdrawn.id
    assert recs[0].headers["correlation_id"] == recs[1].headers["correlation_id"]


async def test_request_times_out_and_a_late_reply_is_dropped(tmp_path: Path) -> None:
    t = topic()
    app = App("svc", broker=f"sqlite:///{tmp_path / 'b.db'}")
    replies = Replies.for_app(app)
    gate = anyio.Event()

    @app.subscriber(t, group="slow")
    async def slow(body: dict[str, int], ctx: Context) -> None:
        await gate.wait()
        await reply(ctx, {"late": body["n"]})

    @app.subscriber(t, group="fast")
    async def fast(body: dict[str, int], ctx: Context) -> None:
        if body["n"] == 2:
            await reply(ctx, {"double": body["n"] * 2})

    async with app:
        with pytest.raises(TimeoutError, match="no reply"):
            await replies.request(t, {"n": 1}, timeout=0.3)
        gate.set()  # the slow group now answers request 1: nobody waits, dropped
        answer = await replies.request(t, {"n": 2}, timeout=5)
        assert answer.payload in (b'{"double":4}', b'{"late":2}')
