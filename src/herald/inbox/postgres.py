"""The PostgreSQL inbox: handled message keys in a table, claimed in the handler's transaction.

Needs ``psycopg`` 3 (``pip install 'herald[postgres]'``).

Schema
    ``<table>(grp text, key text, at timestamptz DEFAULT now(), PRIMARY KEY (grp, key))`` and
    an index on ``at`` for :meth:`~PostgresInbox.purge`. Times are the *server's* clock, so
    workers with skewed clocks agree on what is old.

Connections
    * One shared autocommit connection serves :meth:`~PostgresInbox.seen` (one indexed lookup,
      one round trip) and :meth:`~PostgresInbox.record` (one ``INSERT ... SELECT unnest(...)``
      per batch, one round trip). psycopg serialises concurrent use of one connection.
    * Each open :meth:`~PostgresInbox.transaction` has a connection of its own, taken from a
      small pool of idle ones (at most ``pool_size`` kept; more are opened when needed).

Transactional mode
    :meth:`~PostgresInbox.transaction` runs ``INSERT ... ON CONFLICT DO NOTHING RETURNING 1``
    in a new transaction and yields its :class:`psycopg.AsyncConnection`. The handler writes
    its own tables through it (``await conn.execute(...)``); do not commit or roll back on it.
    Two workers claiming the same key at once: the second one's insert waits on the unique
    index until the first commits, then finds the key taken and gets ``None`` (if the first
    rolls back, the second claims it). So a key's handler effect commits exactly once.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import anyio
import psycopg
from psycopg import sql

from herald.inbox.base import DEFAULT_RETENTION, InboxStore
from herald.transports import redact_url
from herald.transports.base import TransportError

__all__ = ["PostgresInbox"]

# a table name, optionally schema-qualified; quoted as identifiers, so this only keeps
# names readable and within PostgreSQL's 63-byte limit
_TABLE_NAME = re.compile(r"(?:[A-Za-z_][A-Za-z0-9_]{0,62}\.)?[A-Za-z_][A-Za-z0-9_]{0,62}")
_PASSWORD_KV = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)


def redact_dsn(dsn: str) -> str:
    """``dsn`` (a URL or ``key=value`` string) with its password replaced by ``***``."""
    if "://" in dsn:
        return redact_url(dsn)
    return _PASSWORD_KV.sub(r"\1***", dsn)


class PostgresInbox(InboxStore):
    """An :class:`~herald.inbox.InboxStore` in a PostgreSQL table.

    :param dsn: a libpq connection string or URL (``postgresql://user:pw@host/db``).
    :param table: the table, optionally ``schema.table``; created by :meth:`open` if missing.
    :param retention: seconds a record is kept; :meth:`purge` deletes older ones.
    :param pool_size: idle transaction connections kept for reuse.
    :param connect_timeout: seconds to wait for the server when connecting.

    :meth:`open` may be called by several users (one per consumer group sharing the store);
    connections are released when the last of them calls :meth:`close`.
    """

    def __init__(
        self,
        dsn: str,
        *,
        table: str = "herald_inbox",
        retention: float = DEFAULT_RETENTION,
        pool_size: int = 4,
        connect_timeout: float = 10.0,
    ) -> None:
        if not _TABLE_NAME.fullmatch(table):
            raise ValueError(
                f"invalid inbox table name {table!r}: use letters, digits and _ "
                "(optionally schema.table)"
            )
        if retention <= 0:
            raise ValueError("retention must be positive")
        self.dsn = dsn
        self.table = table
        self.retention = retention
        self.pool_size = pool_size
        self.connect_timeout = connect_timeout
        ident = sql.Identifier(*table.split("."))
        self._seen_q = sql.SQL("SELECT 1 FROM {} WHERE grp = %s AND key = %s").format(ident)
        self._record_q = sql.SQL(
            "INSERT INTO {} (grp, key) SELECT %s, unnest(%s::text[]) ON CONFLICT DO NOTHING"
        ).format(ident)
        self._claim_q = sql.SQL(
            "INSERT INTO {} (grp, key) VALUES (%s, %s) ON CONFLICT DO NOTHING RETURNING 1"
        ).format(ident)
        self._purge_q = sql.SQL(
            "DELETE FROM {} WHERE at < now() - make_interval(secs => %s)"
        ).format(ident)
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._idle: list[psycopg.AsyncConnection[Any]] = []

    def __repr__(self) -> str:
        return f"PostgresInbox({redact_dsn(self.dsn)!r}, table={self.table!r})"

    # --- lifecycle -------------------------------------------------------------------------

    async def _acquire(self) -> None:
        """Connect and create the table if missing (safe from several processes at once).
        Raise :class:`~herald.TransportError` (password redacted) if the server is unreachable
        or refuses."""
        conn = await self._connect()
        try:
            await self._create(conn)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await conn.close()
            raise
        self._conn = conn

    async def _create(self, conn: psycopg.AsyncConnection[Any]) -> None:
        name = self.table.rpartition(".")[2]
        ident = sql.Identifier(*self.table.split("."))
        try:
            async with conn.transaction():
                # CREATE TABLE IF NOT EXISTS is not safe against a concurrent creator (it can
                # fail on the pg_type unique index); a transaction-scoped advisory lock on the
                # table name makes concurrent opens take turns.
                await conn.execute(
                    "SELECT pg_advisory_xact_lock(hashtext(%s))", (f"herald_inbox:{self.table}",)
                )
                await conn.execute(
                    sql.SQL(
                        "CREATE TABLE IF NOT EXISTS {} (grp text NOT NULL, key text NOT NULL,"
                        " at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (grp, key))"
                    ).format(ident)
                )
                # an index name takes no schema: the index lives in its table's schema
                await conn.execute(
                    sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} (at)").format(
                        sql.Identifier(f"{name}_at"), ident
                    )
                )
        except psycopg.Error as exc:
            raise self._error(exc, f"creating table {self.table!r}") from exc

    async def _release(self) -> None:
        conn, self._conn = self._conn, None
        idle, self._idle = self._idle, []
        for c in (conn, *idle):
            if c is not None:
                await c.close()

    async def _connect(self) -> psycopg.AsyncConnection[Any]:
        try:
            return await psycopg.AsyncConnection.connect(
                self.dsn, autocommit=True, connect_timeout=max(1, round(self.connect_timeout))
            )
        except psycopg.Error as exc:
            raise self._error(exc, "connect") from exc

    # --- the contract ----------------------------------------------------------------------

    async def seen(self, group: str, key: str) -> bool:
        """Whether ``key`` is recorded for ``group``: one indexed lookup."""
        conn = self._shared()
        try:
            cur = await conn.execute(self._seen_q, (group, key))
            return await cur.fetchone() is not None
        except psycopg.Error as exc:
            raise self._error(exc, "lookup") from exc

    async def record(self, group: str, keys: Sequence[str]) -> None:
        """Record ``keys`` in one statement (autocommit: committed when this returns)."""
        if not keys:
            return
        conn = self._shared()
        try:
            await conn.execute(self._record_q, (group, list(keys)))
        except psycopg.Error as exc:
            raise self._error(exc, "record") from exc

    @asynccontextmanager
    async def transaction(
        self, group: str, key: str
    ) -> AsyncIterator[psycopg.AsyncConnection[Any] | None]:
        """Claim ``key`` in a new transaction on a connection of its own.

        Yields that connection if the key was new, or ``None`` if it is already recorded
        (waiting, if another transaction holds an uncommitted claim of the key, for it to end).
        A clean exit commits the claim and the handler's writes; an exception rolls both back.
        """
        self._shared()  # fail early, and clearly, when not open
        conn = await self._take()
        try:
            async with conn.transaction():
                try:
                    cur = await conn.execute(self._claim_q, (group, key))
                    claimed = await cur.fetchone() is not None
                except psycopg.Error as exc:
                    raise self._error(exc, "claim") from exc
                # the body of the claim's transaction: psycopg commits it on a clean exit and
                # rolls it back (re-raising) on an exception
                yield conn if claimed else None
        finally:
            with anyio.CancelScope(shield=True):
                await self._give_back(conn)

    async def purge(self) -> int:
        """Delete records older than ``retention`` seconds (server time); return how many."""
        conn = self._shared()
        try:
            cur = await conn.execute(self._purge_q, (float(self.retention),))
        except psycopg.Error as exc:
            raise self._error(exc, "purge") from exc
        return max(cur.rowcount, 0)

    # --- plumbing --------------------------------------------------------------------------

    def _shared(self) -> psycopg.AsyncConnection[Any]:
        conn = self._conn
        if conn is None:
            raise TransportError(
                f"postgres inbox {redact_dsn(self.dsn)!r} is not open; call open() first"
            )
        return conn

    async def _take(self) -> psycopg.AsyncConnection[Any]:
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed:
                return conn
        return await self._connect()

    async def _give_back(self, conn: psycopg.AsyncConnection[Any]) -> None:
        # Only a connection whose transaction ended (committed or rolled back) goes back to the
        # pool; one left mid-transaction (its rollback was cancelled) or broken is closed,
        # which also ends its transaction on the server.
        idle = psycopg.pq.TransactionStatus.IDLE
        if (
            self._conn is not None
            and len(self._idle) < self.pool_size
            and not conn.closed
            and conn.info.transaction_status == idle
        ):
            self._idle.append(conn)
        else:
            await conn.close()

    def _error(self, exc: psycopg.Error, action: str) -> TransportError:
        text = str(exc).strip()
        password = _password(self.dsn)
        if password:
            text = text.replace(password, "***")
        return TransportError(f"postgres inbox {action} failed on {redact_dsn(self.dsn)!r}: {text}")


def _password(dsn: str) -> str | None:
    try:
        password = psycopg.conninfo.conninfo_to_dict(dsn).get("password")
    except psycopg.Error:
        return None
    return str(password) if password else None
