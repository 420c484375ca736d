"""Read-model databases: where projections write and queries read.

::

    db = ReadModel("sqlite:///read.db")           # or "postgresql://..."
    async with db:
        rows = await db.fetch("SELECT id, balance FROM balances WHERE balance > ?", (0,))

A projection writes inside :meth:`ReadModel.transaction`, which also holds the projection's
position (table ``herald_projections``), so its writes and its position commit together:
exactly-once effect on that database, across crashes.

SQL uses ``?`` placeholders on both engines (on PostgreSQL they become ``%s``, so a literal
``?`` or ``%`` in the SQL text must be written as a bound parameter instead).

SQLite: one writer connection (``BEGIN IMMEDIATE`` waited for in a worker thread, statements
inline: microseconds each), WAL mode, ``synchronous=NORMAL`` — a power cut may lose the last
commits, but writes and position together, so the projection simply redoes them. Readers use
their own connection and never wait for the writer. PostgreSQL: one connection for
transactions, one for queries.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.to_thread

from herald.eventsourcing.recorded import Recorded
from herald.transports import TransportError, redact_url

__all__ = ["ReadModel", "Tx"]

_POSITIONS = (
    "CREATE TABLE IF NOT EXISTS herald_projections (name TEXT PRIMARY KEY,"
    " position BIGINT NOT NULL, updated_at DOUBLE PRECISION NOT NULL)"
)


class Tx:
    """One read-model transaction (do not commit or roll back yourself)."""

    def __init__(self, db: ReadModel, conn: Any) -> None:
        self.db = db
        self.connection = conn
        #: the stored event being projected (set by the projection before each handler call)
        self.recorded: Recorded | None = None

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> None:
        if self.db.is_sqlite:
            self.connection.execute(sql, params)
        else:
            await self.connection.execute(self.db.translate(sql), params)

    async def fetch(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        if self.db.is_sqlite:
            rows: list[tuple[Any, ...]] = self.connection.execute(sql, params).fetchall()
            return rows
        cur = await self.connection.execute(self.db.translate(sql), params)
        out: list[tuple[Any, ...]] = await cur.fetchall()
        return out

    async def fetchone(self, sql: str, params: Sequence[Any] = ()) -> tuple[Any, ...] | None:
        rows = await self.fetch(sql, params)
        return rows[0] if rows else None


class ReadModel:
    """A database of read models (SQLite file or PostgreSQL); see the module docstring."""

    def __init__(self, url: str) -> None:
        scheme, sep, rest = url.partition("://")
        scheme = scheme.lower()
        if not sep or scheme not in ("sqlite", "postgresql", "postgres"):
            raise ValueError(f"read model URL must be sqlite:/// or postgresql://, got {url!r}")
        self.url = url
        self.is_sqlite = scheme == "sqlite"
        self.path = (rest[1:] if rest.startswith("/") else rest) if self.is_sqlite else ""
        if self.is_sqlite and not self.path:
            raise ValueError(f"sqlite read model needs a file path, got {url!r}")
        self._writer: Any = None
        self._reader: Any = None
        self._lock = anyio.Lock()  # open/close
        self._tx_lock = anyio.Lock()  # one transaction at a time on the writer connection
        self._users = 0

    def __repr__(self) -> str:
        return f"ReadModel({redact_url(self.url)!r})"

    @staticmethod
    def translate(sql: str) -> str:
        return sql.replace("?", "%s")

    async def open(self) -> None:
        """Connect (first user) and create the positions table. ``TransportError`` if the
        database cannot be reached."""
        async with self._lock:
            if self._users == 0:
                try:
                    await self._connect()
                except (sqlite3.Error, OSError) as e:
                    raise TransportError(f"cannot open read model {self!r}: {e}") from e
            self._users += 1

    async def _connect(self) -> None:
        if self.is_sqlite:

            def connect() -> tuple[sqlite3.Connection, sqlite3.Connection]:
                w = sqlite3.connect(
                    self.path, isolation_level=None, check_same_thread=False, timeout=30
                )
                w.execute("PRAGMA journal_mode=WAL")
                w.execute("PRAGMA synchronous=NORMAL")
                w.execute(_POSITIONS)
                r = sqlite3.connect(
                    self.path, isolation_level=None, check_same_thread=False, timeout=30
                )
                return w, r

            self._writer, self._reader = await anyio.to_thread.run_sync(connect)
            return
        import psycopg

        try:
            self._writer = await psycopg.AsyncConnection.connect(self.url, autocommit=True)
            self._reader = await psycopg.AsyncConnection.connect(self.url, autocommit=True)
            await self._writer.execute(_POSITIONS)
        except psycopg.Error as e:
            await self._disconnect()
            raise TransportError(f"cannot open read model {self!r}: {e}") from e

    async def close(self) -> None:
        async with self._lock:
            if self._users == 0:
                return
            self._users -= 1
            if self._users == 0:
                with anyio.CancelScope(shield=True):
                    await self._disconnect()

    async def _disconnect(self) -> None:
        w, r, self._writer, self._reader = self._writer, self._reader, None, None
        for c in (r, w):
            if c is not None:
                if self.is_sqlite:
                    c.close()
                else:
                    await c.close()

    async def __aenter__(self) -> ReadModel:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Tx]:
        """A write transaction: commits when the block exits, rolls back if it raises."""
        if self._writer is None:
            raise RuntimeError("the read model is not open (use `async with db:`)")
        conn = self._writer
        if not self.is_sqlite:
            async with self._tx_lock, conn.transaction():
                yield Tx(self, conn)
            return
        async with self._tx_lock:
            await anyio.to_thread.run_sync(conn.execute, "BEGIN IMMEDIATE")
            try:
                yield Tx(self, conn)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    async def fetch(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Run a query on the read connection (queries read read models directly)."""
        if self._reader is None:
            raise RuntimeError("the read model is not open (use `async with db:`)")
        if self.is_sqlite:
            rows: list[tuple[Any, ...]] = self._reader.execute(sql, params).fetchall()
            return rows
        cur = await self._reader.execute(self.translate(sql), params)
        out: list[tuple[Any, ...]] = await cur.fetchall()
        return out

    async def fetchone(self, sql: str, params: Sequence[Any] = ()) -> tuple[Any, ...] | None:
        rows = await self.fetch(sql, params)
        return rows[0] if rows else None

    async def position(self, name: str) -> int:
        """A projection's committed position (0 if it never ran)."""
        row = await self.fetchone("SELECT position FROM herald_projections WHERE name = ?", (name,))
        return int(row[0]) if row else 0
