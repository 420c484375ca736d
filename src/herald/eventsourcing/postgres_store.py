"""The PostgreSQL event store backend (psycopg 3, async).

Tables as in the SQLite backend (``<prefix>_events`` with ``position bigint`` from a sequence,
``headers jsonb``, ``recorded_at double precision``), created if missing.

Commit order (why appends take a lock)
    A sequence hands out positions at insert time, but transactions commit in any order: a
    writer can take position 10, commit after the writer of 11, and a reader that saw 11 moves
    past 10 for good. So every append transaction first takes one transaction-scoped advisory
    lock (``pg_advisory_xact_lock``, keyed by the table prefix) and only then draws positions:
    positions are drawn and committed one transaction at a time, and a reader that sees
    position ``p`` has every event below ``p`` already visible. Throughput stays high because
    concurrent appends of one process share a transaction (group commit, driven by the store);
    writers in other processes queue on the lock.

Connections
    One connection writes (appends, snapshots, the relay's lease and cursor), one autocommit
    connection reads; psycopg serialises the concurrent use of each.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Any

import anyio
import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from herald.eventsourcing.backend import AppendRequest, StoreBackend
from herald.eventsourcing.errors import ConcurrencyError
from herald.eventsourcing.recorded import Recorded, Snapshot
from herald.transports import TransportError, redact_url

__all__ = ["PostgresBackend"]

_COLUMNS = (
    "position, stream, version, id, type, schema_version, content_type, payload, headers, "
    "recorded_at, topic"
)


def _recorded(row: tuple[Any, ...]) -> Recorded:
    return Recorded(
        row[0], row[1], row[2], row[3], row[4], row[5], row[6], bytes(row[7]), row[8], row[9],
        row[10],
    )  # fmt: skip


class PostgresBackend(StoreBackend):
    def __init__(self, dsn: str, prefix: str, connect_timeout: float = 10.0) -> None:
        self.dsn = dsn
        self.p = prefix
        self.connect_timeout = connect_timeout
        # the advisory lock key: one per store (prefix), stable across processes
        self._lock_key = zlib.crc32(f"herald.eventsourcing:{prefix}".encode()) - (1 << 31)
        self._writer: psycopg.AsyncConnection[Any] | None = None
        self._reader: psycopg.AsyncConnection[Any] | None = None
        self._wlock = anyio.Lock()

    def _t(self, suffix: str) -> sql.Identifier:
        return sql.Identifier(f"{self.p}_{suffix}")

    async def _connect(self) -> psycopg.AsyncConnection[Any]:
        try:
            with anyio.fail_after(self.connect_timeout + 1):
                return await psycopg.AsyncConnection.connect(
                    self.dsn, autocommit=True, connect_timeout=int(self.connect_timeout)
                )
        except (psycopg.Error, TimeoutError, OSError) as e:
            raise TransportError(
                f"cannot connect to the event store {redact_url(self.dsn)}: {e}"
            ) from e

    async def open(self) -> None:
        self._writer = await self._connect()
        self._reader = await self._connect()
        ev, sn, rl = self._t("events"), self._t("snapshots"), self._t("relay")
        stmts = [
            sql.SQL(
                "CREATE TABLE IF NOT EXISTS {} (position bigint PRIMARY KEY, stream text NOT NULL,"
                " version int NOT NULL, id text NOT NULL, type text NOT NULL,"
                " schema_version int NOT NULL, content_type text NOT NULL, payload bytea NOT NULL,"
                " headers jsonb NOT NULL, recorded_at double precision NOT NULL, topic text,"
                " UNIQUE (stream, version))"
            ).format(ev),
            sql.SQL("CREATE SEQUENCE IF NOT EXISTS {}").format(self._t("positions")),
            sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} (topic, position)").format(
                self._t("events_topic"), ev
            ),
            sql.SQL(
                "CREATE TABLE IF NOT EXISTS {} (stream text NOT NULL, kind text NOT NULL,"
                " version int NOT NULL, shape text NOT NULL, state bytea NOT NULL,"
                " recorded_at double precision NOT NULL, PRIMARY KEY (stream, kind, version))"
            ).format(sn),
            sql.SQL(
                "CREATE TABLE IF NOT EXISTS {} (name text PRIMARY KEY, position bigint NOT NULL,"
                " owner text, lease_until double precision NOT NULL)"
            ).format(rl),
        ]
        try:
            async with self._writer.transaction():
                # concurrent CREATE IF NOT EXISTS can still collide in the catalog: serialise
                await self._writer.execute("SELECT pg_advisory_xact_lock(%s)", (self._lock_key,))
                for s in stmts:
                    await self._writer.execute(s)
        except psycopg.Error as e:
            await self.close()
            raise TransportError(f"cannot create the event store tables: {e}") from e
        self._q_version = sql.SQL("SELECT max(version) FROM {} WHERE stream = %s").format(ev)
        self._q_insert = sql.SQL(
            "INSERT INTO {} (position, stream, version, id, type, schema_version, content_type,"
            " payload, headers, recorded_at, topic) SELECT nextval({}), s, v, i, t, sv, ct, p,"
            " h, %s, %s FROM unnest(%s::text[], %s::int[], %s::text[], %s::text[], %s::int[],"
            " %s::text[], %s::bytea[], %s::jsonb[]) AS x(s, v, i, t, sv, ct, p, h)"
            " RETURNING position, version"
        ).format(ev, sql.Literal(f"{self.p}_positions"))

    async def close(self) -> None:
        w, r, self._writer, self._reader = self._writer, self._reader, None, None
        with anyio.CancelScope(shield=True):
            for c in (r, w):
                if c is not None:
                    await c.close()

    def _w(self) -> psycopg.AsyncConnection[Any]:
        if self._writer is None:
            raise RuntimeError("the event store is not open (use `async with store:`)")
        return self._writer

    def _r(self) -> psycopg.AsyncConnection[Any]:
        if self._reader is None:
            raise RuntimeError("the event store is not open (use `async with store:`)")
        return self._reader

    # --- events ----------------------------------------------------------------------------

    async def append(self, requests: Sequence[AppendRequest], now: float) -> None:
        conn = self._w()
        async with self._wlock:
            with anyio.CancelScope(shield=True):
                async with conn.transaction():
                    await conn.execute("SELECT pg_advisory_xact_lock(%s)", (self._lock_key,))
                    for req in requests:
                        await self._append_one(conn, req, now)

    async def _append_one(
        self, conn: psycopg.AsyncConnection[Any], req: AppendRequest, now: float
    ) -> None:
        req.error, req.result = None, []
        cur = await conn.execute(self._q_version, (req.stream,))
        row = await cur.fetchone()
        actual = (row[0] if row else None) or 0
        if req.expected_version is not None and actual != req.expected_version:
            req.error = ConcurrencyError(req.stream, req.expected_version, actual)
            return
        evs = req.events
        if not evs:
            return
        n = len(evs)
        cur = await conn.execute(
            self._q_insert,
            (
                now,
                req.topic,
                [req.stream] * n,
                list(range(actual + 1, actual + n + 1)),
                [e.id for e in evs],
                [e.type for e in evs],
                [e.schema_version for e in evs],
                [e.content_type for e in evs],
                [e.payload for e in evs],
                [Jsonb(e.headers) for e in evs],
            ),
        )
        positions = dict((v, p) for p, v in await cur.fetchall())
        ordered = [positions[v] for v in sorted(positions)]
        if ordered != sorted(ordered):  # unnest scans in array order; make sure of it
            raise RuntimeError(f"positions of {req.stream!r} not in version order: {positions}")
        req.result = [
            Recorded(positions[actual + i], req.stream, actual + i, e.id, e.type,
                     e.schema_version, e.content_type, e.payload, e.headers, now, req.topic)
            for i, e in enumerate(evs, 1)
        ]  # fmt: skip
        s = req.snapshot
        if s is not None:
            await self._put_snapshot(conn, s, req.result[-1].version, now)

    async def _put_snapshot(
        self, conn: psycopg.AsyncConnection[Any], s: Snapshot, version: int, now: float
    ) -> None:
        await conn.execute(
            sql.SQL(
                "INSERT INTO {} VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (stream, kind,"
                " version) DO UPDATE SET shape = excluded.shape, state = excluded.state"
            ).format(self._t("snapshots")),
            (s.stream, s.kind, version, s.shape, s.state, now),
        )

    async def _fetch(self, q: sql.Composed, args: Sequence[Any]) -> list[tuple[Any, ...]]:
        cur = await self._r().execute(q, args)
        rows: list[tuple[Any, ...]] = await cur.fetchall()
        return rows

    async def read_stream(
        self, stream: str, after_version: int = 0, to_version: int | None = None
    ) -> list[Recorded]:
        top = to_version if to_version is not None else 1 << 30
        rows = await self._fetch(
            sql.SQL(
                "SELECT " + _COLUMNS + " FROM {} WHERE stream = %s AND version > %s AND "
                "version <= %s ORDER BY version"
            ).format(self._t("events")),
            (stream, after_version, top),
        )
        return [_recorded(r) for r in rows]

    def _topics(self, topics: Sequence[str] | None) -> tuple[sql.Composable, list[Any]]:
        if topics is None:
            return sql.SQL(""), []
        return sql.SQL(" AND topic = ANY(%s)"), [list(topics)]

    async def read_all(
        self, after_position: int, limit: int, topics: Sequence[str] | None = None
    ) -> list[Recorded]:
        where, args = self._topics(topics)
        rows = await self._fetch(
            sql.SQL("SELECT " + _COLUMNS + " FROM {} WHERE position > %s{} ORDER BY position "
                    "LIMIT %s").format(self._t("events"), where),
            (after_position, *args, limit),
        )  # fmt: skip
        return [_recorded(r) for r in rows]

    async def head(self, topics: Sequence[str] | None = None) -> int:
        where, args = self._topics(topics)
        rows = await self._fetch(
            sql.SQL("SELECT max(position) FROM {} WHERE true{}").format(self._t("events"), where),
            args,
        )
        return int(rows[0][0] or 0)

    async def count_after(self, position: int, topics: Sequence[str] | None = None) -> int:
        where, args = self._topics(topics)
        rows = await self._fetch(
            sql.SQL("SELECT count(*) FROM {} WHERE position > %s{}").format(
                self._t("events"), where
            ),
            (position, *args),
        )
        return int(rows[0][0])

    async def version_at(self, stream: str, timestamp: float) -> int:
        rows = await self._fetch(
            sql.SQL("SELECT max(version) FROM {} WHERE stream = %s AND recorded_at <= %s").format(
                self._t("events")
            ),
            (stream, timestamp),
        )
        return int(rows[0][0] or 0)

    # --- snapshots -------------------------------------------------------------------------

    async def save_snapshot(self, snapshot: Snapshot) -> None:
        conn = self._w()
        async with self._wlock:
            with anyio.CancelScope(shield=True):
                await self._put_snapshot(conn, snapshot, snapshot.version, snapshot.recorded_at)

    async def latest_snapshot(
        self, stream: str, kind: str, max_version: int | None = None
    ) -> Snapshot | None:
        top = max_version if max_version is not None else 1 << 30
        rows = await self._fetch(
            sql.SQL(
                "SELECT stream, version, kind, shape, state, recorded_at FROM {} WHERE stream = %s"
                " AND kind = %s AND version <= %s ORDER BY version DESC LIMIT 1"
            ).format(self._t("snapshots")),
            (stream, kind, top),
        )
        if not rows:
            return None
        r = rows[0]
        return Snapshot(r[0], r[1], r[2], r[3], bytes(r[4]), r[5])

    # --- relay -----------------------------------------------------------------------------

    async def claim_relay(self, name: str, owner: str, ttl: float, now: float) -> int | None:
        rl = self._t("relay")
        conn = self._w()
        async with self._wlock:
            with anyio.CancelScope(shield=True):
                await conn.execute(
                    sql.SQL("INSERT INTO {} VALUES (%s, 0, NULL, 0) ON CONFLICT DO NOTHING").format(
                        rl
                    ),
                    (name,),
                )
                cur = await conn.execute(
                    sql.SQL(
                        "UPDATE {} SET owner = %s, lease_until = %s WHERE name = %s AND"
                        " (owner IS NULL OR owner = %s OR lease_until < %s) RETURNING position"
                    ).format(rl),
                    (owner, now + ttl, name, owner, now),
                )
                row = await cur.fetchone()
        return None if row is None else int(row[0])

    async def advance_relay(self, name: str, owner: str, position: int, release: bool) -> None:
        q = "UPDATE {} SET position = greatest(position, %s)"
        if release:
            q += ", owner = NULL, lease_until = 0"
        conn = self._w()
        async with self._wlock:
            with anyio.CancelScope(shield=True):
                await conn.execute(
                    sql.SQL(q + " WHERE name = %s AND owner = %s").format(self._t("relay")),
                    (position, name, owner),
                )

    async def relay_position(self, name: str) -> int:
        rows = await self._fetch(
            sql.SQL("SELECT position FROM {} WHERE name = %s").format(self._t("relay")), (name,)
        )
        return int(rows[0][0]) if rows else 0
