"""A projection worker for the crash test: runs the app (projection subscriber on the SQLite
broker) and SIGKILLs itself in the middle of a batch after KILL_AT events were applied.

Usage: python es_projection_child.py BROKER STORE PREFIX READ_DB KILL_AT
"""

from __future__ import annotations

import sys
from pathlib import Path

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from herald import App
from herald.eventsourcing import EventStore, projection
from tests.es_support import BankViews


async def main(broker: str, store_url: str, prefix: str, read_db: str, kill_at: int) -> None:
    app = App("bank", broker=broker)
    store = EventStore(store_url, prefix=prefix)
    BankViews.kill_at = kill_at
    projection(app, store, db=read_db, topics=["account"], name="views", batch=100)(BankViews)
    async with app:
        await anyio.sleep(60)
    print("not killed", file=sys.stderr)
    sys.exit(3)


if __name__ == "__main__":
    anyio.run(main, *sys.argv[1:5], int(sys.argv[5]))
