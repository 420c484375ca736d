"""A writer process for the relay crash test: saves deposits with the relay on, and SIGKILLs
itself in the middle of a publish (part of a batch on the bus, the cursor not moved), right
after committing events it never publishes.

Usage: python es_relay_child.py BROKER STORE PREFIX KILL_AFTER
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from herald import App, Message
from herald.eventsourcing import EventStore, Repository
from tests.es_support import Account, MoneyDeposited


async def main(broker: str, store_url: str, prefix: str, kill_after: int) -> None:
    app = App("bank", broker=broker)
    store = EventStore(store_url, prefix=prefix)
    repo = Repository(Account, store, app=app)
    transport = app.transport
    real_publish = transport.publish
    published = 0

    async def publish(topic: str, messages: Sequence[Message]) -> None:
        nonlocal published
        if published + len(messages) >= kill_after:
            # commit more events nobody will publish, put part of this batch on the bus, die
            await store.append("acc-0", [MoneyDeposited(1000)], None, topic=repo.topic)
            cut = max(1, kill_after - published)
            await real_publish(topic, list(messages)[:cut])
            os.kill(os.getpid(), signal.SIGKILL)
        await real_publish(topic, messages)
        published += len(messages)

    transport.publish = publish  # type: ignore[method-assign]
    async with app:
        for i in range(5):
            await repo.update(f"acc-{i}", lambda a: a.open("owner"), create=True)

        async def depositor(i: int) -> None:
            for n in range(1, 200):
                await repo.update(f"acc-{i}", lambda a, n=n: a.deposit(n))

        async with anyio.create_task_group() as tg:
            for i in range(5):
                tg.start_soon(depositor, i)
    print("not killed", file=sys.stderr)
    sys.exit(3)


if __name__ == "__main__":
    anyio.run(main, sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
