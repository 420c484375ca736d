"""The SQLite event store backend: one file (it may be the broker's own file).

Tables (``<prefix>`` defaults to ``herald_es``)
    ``<prefix>_events(position INTEGER PRIMARY KEY, stream, version, id, type,
    schema_version, content_type, payload BLOB, headers JSON, recorded_at REAL, topic,
    UNIQUE (stream, version))`` plus an index on ``(topic, position)``;
    ``<prefix>_snapshots(stream, kind, version, shape, state BLOB, recorded_at)``;
    ``<prefix>_relay(name, position, owner, lease_until)``.

Commit order
    SQLite has one writer at a time: positions are assigned inside the write transaction
    (``BEGIN IMMEDIATE``), so commit order is position order and :meth:`read_all` is gap-free.

Threads and durability
    Writes run in a worker thread on one writer connection, ``synchronous=FULL`` in WAL mode
    (each commit fsync'd, as the SQLite broker does): an append that returned survives a power
    cut. Concurrent appends share one transaction and one fsync (group commit, driven by the
    store). Reads run inline on a read-only connection: WAL readers never wait for the writer.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import anyio
import anyio.to_thread
import msgspec

from herald.eventsourcing.backend import AppendRequest, StoreBackend
from herald.eventsourcing.errors import ConcurrencyError
from herald.eventsourcing.recorded import Recorded, Snapshot
from herald.transports import TransportError

__all__ = ["SqliteBackend"]

T = TypeVar("T")
_COLUMNS = (
    "position, stream, version, id, type, schema_version, content_type, payload, headers, "
    "recorded_at, topic"
)
_json_encode = msgspec.json.Encoder().encode
_json_headers = msgspec.json.Decoder(dict[str, str]).decode


def _recorded(row: tuple[Any, ...]) -> Recorded:
    return Recorded(
        row[0], row[1], row[2], row[3], row[4], row[5], row[6], row[7],
        _json_headers(row[8]), row[9], row[10],
    )  # fmt: skip


class SqliteBackend(StoreBackend):
    def __init__(self, path: str, prefix: str, busy_timeout: float = 30.0) -> None:
        self.path = path
        self.p = prefix
        self.busy_timeout = busy_timeout
        self._writer: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None
        self._lock = anyio.Lock()
        p = prefix
        self._q_version = f"SELECT max(version) FROM {p}_events WHERE stream = ?"
        self._q_insert = (
            f"INSERT INTO {p}_events (stream, version, id, type, schema_version, content_type,"
            " payload, headers, recorded_at, topic) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
        )
        self._q_stream = (
            f"SELECT {_COLUMNS} FROM {p}_events WHERE stream = ? AND version > ? "
            "AND version <= ? ORDER BY version"
        )

    # --- connections -----------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False, timeout=self.busy_timeout
        )
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        return conn

    def _create(self) -> None:
        p = self.p
        w = self._connect()
        self._writer = w
        w.execute("BEGIN IMMEDIATE")
        try:
            w.execute(
                f"CREATE TABLE IF NOT EXISTS {p}_events (position INTEGER PRIMARY KEY,"
                " stream TEXT NOT NULL, version INTEGER NOT NULL, id TEXT NOT NULL,"
                " type TEXT NOT NULL, schema_version INTEGER NOT NULL,"
                " content_type TEXT NOT NULL, payload BLOB NOT NULL, headers TEXT NOT NULL,"
                " recorded_at REAL NOT NULL, topic TEXT, UNIQUE (stream, version))"
            )
            w.execute(
                f"CREATE INDEX IF NOT EXISTS {p}_events_topic ON {p}_events (topic, position)"
            )
            w.execute(
                f"CREATE TABLE IF NOT EXISTS {p}_snapshots (stream TEXT NOT NULL,"
                " kind TEXT NOT NULL, version INTEGER NOT NULL, shape TEXT NOT NULL,"
                " state BLOB NOT NULL, recorded_at REAL NOT NULL,"
                " PRIMARY KEY (stream, kind, version)) WITHOUT ROWID"
            )
            w.execute(
                f"CREATE TABLE IF NOT EXISTS {p}_relay (name TEXT PRIMARY KEY,"
                " position INTEGER NOT NULL, owner TEXT, lease_until REAL NOT NULL)"
            )
            w.execute("COMMIT")
        except BaseException:
            w.execute("ROLLBACK")
            raise
        r = sqlite3.connect(
            f"file:{Path(self.path).resolve()}?mode=ro",
            uri=True,
            isolation_level=None,
            check_same_thread=False,
            timeout=self.busy_timeout,
        )
        self._reader = r

    async def open(self) -> None:
        try:
            await anyio.to_thread.run_sync(self._create)
        except sqlite3.Error as e:
            await self.close()
            raise TransportError(f"cannot open the event store {self.path!r}: {e}") from e

    async def close(self) -> None:
        w, r, self._writer, self._reader = self._writer, self._reader, None, None
        for c in (r, w):
            if c is not None:
                c.close()

    def _w(self) -> sqlite3.Connection:
        if self._writer is None:
            raise RuntimeError("the event store is not open (use `async with store:`)")
        return self._writer

    def _r(self) -> sqlite3.Connection:
        if self._reader is None:
            raise RuntimeError("the event store is not open (use `async with store:`)")
        return self._reader

    async def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        conn = self._w()

        def run() -> T:
            conn.execute("BEGIN IMMEDIATE")
            try:
                out = fn(conn)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            return out

        async with self._lock:
            with anyio.CancelScope(shield=True):  # a started commit is waited for, never torn
                out = await anyio.to_thread.run_sync(run)
        return out

    # --- events ----------------------------------------------------------------------------

    async def append(self, requests: Sequence[AppendRequest], now: float) -> None:
        q_version, q_insert = self._q_version, self._q_insert

        def run(conn: sqlite3.Connection) -> None:
            # each request checks its version against what is committed *and* what earlier
            # requests of this batch wrote: within the transaction SQLite sees both
            for req in requests:
                req.error, req.result = None, []
                actual = conn.execute(q_version, (req.stream,)).fetchone()[0] or 0
                if req.expected_version is not None and actual != req.expected_version:
                    req.error = ConcurrencyError(req.stream, req.expected_version, actual)
                    continue
                out = []
                for i, e in enumerate(req.events, 1):
                    cur = conn.execute(
                        q_insert,
                        (req.stream, actual + i, e.id, e.type, e.schema_version, e.content_type,
                         e.payload, _json_encode(e.headers).decode(), now, req.topic),
                    )  # fmt: skip
                    out.append(
                        Recorded(cur.lastrowid or 0, req.stream, actual + i, e.id, e.type,
                                 e.schema_version, e.content_type, e.payload, e.headers, now,
                                 req.topic)
                    )  # fmt: skip
                req.result = out
                s = req.snapshot
                if s is not None and out:
                    conn.execute(
                        f"INSERT OR REPLACE INTO {self.p}_snapshots VALUES (?, ?, ?, ?, ?, ?)",
                        (s.stream, s.kind, out[-1].version, s.shape, s.state, now),
                    )

        await self._write(run)

    async def read_stream(
        self, stream: str, after_version: int = 0, to_version: int | None = None
    ) -> list[Recorded]:
        top = to_version if to_version is not None else 1 << 62
        rows = self._r().execute(self._q_stream, (stream, after_version, top)).fetchall()
        return [_recorded(r) for r in rows]

    def _topic_filter(self, topics: Sequence[str] | None) -> tuple[str, list[str]]:
        if topics is None:
            return "", []
        return f" AND topic IN ({', '.join('?' * len(topics))})", list(topics)

    async def read_all(
        self, after_position: int, limit: int, topics: Sequence[str] | None = None
    ) -> list[Recorded]:
        where, args = self._topic_filter(topics)
        rows = (
            self._r()
            .execute(
                f"SELECT {_COLUMNS} FROM {self.p}_events WHERE position > ?{where} "
                "ORDER BY position LIMIT ?",
                (after_position, *args, limit),
            )
            .fetchall()
        )
        return [_recorded(r) for r in rows]

    async def head(self, topics: Sequence[str] | None = None) -> int:
        where, args = self._topic_filter(topics)
        row = (
            self._r()
            .execute(f"SELECT max(position) FROM {self.p}_events WHERE true{where}", args)
            .fetchone()
        )
        return int(row[0] or 0)

    async def count_after(self, position: int, topics: Sequence[str] | None = None) -> int:
        where, args = self._topic_filter(topics)
        row = (
            self._r()
            .execute(
                f"SELECT count(*) FROM {self.p}_events WHERE position > ?{where}",
                (position, *args),
            )
            .fetchone()
        )
        return int(row[0])

    async def version_at(self, stream: str, timestamp: float) -> int:
        row = (
            self._r()
            .execute(
                f"SELECT max(version) FROM {self.p}_events WHERE stream = ? AND recorded_at <= ?",
                (stream, timestamp),
            )
            .fetchone()
        )
        return int(row[0] or 0)

    # --- snapshots -------------------------------------------------------------------------

    async def save_snapshot(self, snapshot: Snapshot) -> None:
        s = snapshot
        await self._write(
            lambda c: c.execute(
                f"INSERT OR REPLACE INTO {self.p}_snapshots VALUES (?, ?, ?, ?, ?, ?)",
                (s.stream, s.kind, s.version, s.shape, s.state, s.recorded_at),
            )
        )

    async def latest_snapshot(
        self, stream: str, kind: str, max_version: int | None = None
    ) -> Snapshot | None:
        top = max_version if max_version is not None else 1 << 62
        row = (
            self._r()
            .execute(
                f"SELECT stream, version, kind, shape, state, recorded_at FROM {self.p}_snapshots"
                " WHERE stream = ? AND kind = ? AND version <= ? ORDER BY version DESC LIMIT 1",
                (stream, kind, top),
            )
            .fetchone()
        )
        return None if row is None else Snapshot(*row)

    # --- relay -----------------------------------------------------------------------------

    async def claim_relay(self, name: str, owner: str, ttl: float, now: float) -> int | None:
        def run(c: sqlite3.Connection) -> int | None:
            c.execute(
                f"INSERT INTO {self.p}_relay VALUES (?, 0, NULL, 0) ON CONFLICT DO NOTHING",
                (name,),
            )
            row = c.execute(
                f"UPDATE {self.p}_relay SET owner = ?, lease_until = ? WHERE name = ? AND"
                " (owner IS NULL OR owner = ? OR lease_until < ?) RETURNING position",
                (owner, now + ttl, name, owner, now),
            ).fetchone()
            return None if row is None else int(row[0])

        return await self._write(run)

    async def advance_relay(self, name: str, owner: str, position: int, release: bool) -> None:
        sql = f"UPDATE {self.p}_relay SET position = max(position, ?)"
        if release:
            sql += ", owner = NULL, lease_until = 0"
        await self._write(lambda c: c.execute(f"{sql} WHERE name = ? AND owner = ?",
                                              (position, name, owner)))  # fmt: skip

    async def relay_position(self, name: str) -> int:
        row = (
            self._r()
            .execute(f"SELECT position FROM {self.p}_relay WHERE name = ?", (name,))
            .fetchone()
        )
        return 0 if row is None else int(row[0])
