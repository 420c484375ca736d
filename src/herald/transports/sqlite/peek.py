"""Watching a SQLite topic without joining it (:meth:`SqliteTransport.peek`).

Plain ``SELECT`` statements by ``seq`` outside any write transaction: no group row, lease or
cursor is read for writing, so no group receives anything differently. Messages every group
has read are deleted by the consumers' cleanup, so ``last`` reaches back only as far as what
is still retained.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing, asynccontextmanager
from functools import partial
from typing import Any, Protocol, TypeVar

import anyio

from herald.message import Message
from herald.transports.sqlite.options import SqliteOptions
from herald.transports.sqlite.subscription import COLUMNS, row_message

__all__ = ["Reader", "peek"]

T = TypeVar("T")

#: Rows read per query while catching up.
_BATCH = 500


class Reader(Protocol):
    """What a peek needs of the transport."""

    _options: SqliteOptions
    _closed: bool

    def _event(self, topic: str) -> anyio.Event: ...

    async def _read(self, action: str, fn: Callable[[sqlite3.Connection], T]) -> T: ...


@asynccontextmanager
async def peek(db: Reader, topic: str, last: int) -> AsyncIterator[AsyncIterator[Message]]:
    """The ``last`` newest retained messages of ``topic``, then each new one, until ``db``
    closes. Waits are woken by this process's publishes and otherwise poll every
    ``poll_interval``, like a consumer's."""

    def newest(conn: sqlite3.Connection) -> tuple[int, list[Any]]:
        # AUTOINCREMENT never reuses a seq: whatever is published later is above this
        top = conn.execute("SELECT coalesce(max(seq), 0) FROM messages").fetchone()[0]
        rows = conn.execute(
            f"SELECT {COLUMNS} FROM messages WHERE topic = ? ORDER BY seq DESC LIMIT ?",
            (topic, last),
        ).fetchall()
        return int(top), rows[::-1]

    position, rows = await db._read("peek", newest)
    async with aclosing(_follow(db, topic, position, rows)) as messages:
        yield messages


async def _follow(
    db: Reader, topic: str, position: int, rows: list[Any]
) -> AsyncGenerator[Message, None]:
    while True:
        for row in rows:
            yield row_message(topic, row)
        if rows:
            position = max(position, rows[-1][0])
        elif db._closed:
            return
        event = db._event(topic)  # taken before the query: a publish meanwhile still wakes us
        rows = await db._read("peek", partial(_after, topic=topic, seq=position))
        if not rows:
            with anyio.move_on_after(db._options.poll_interval):
                await event.wait()


def _after(conn: sqlite3.Connection, *, topic: str, seq: int) -> list[Any]:
    return conn.execute(
        f"SELECT {COLUMNS} FROM messages WHERE topic = ? AND seq > ? ORDER BY seq LIMIT ?",
        (topic, seq, _BATCH),
    ).fetchall()
