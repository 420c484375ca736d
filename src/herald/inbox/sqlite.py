"""The SQLite inbox: handled message keys in a table of an SQLite file.

The default store of ``subscriber(dedupe=True)`` on an SQLite broker (the file
``<broker>.inbox.db`` beside the broker's). Several processes may share one file.

Schema
    ``herald_inbox(grp TEXT, key TEXT, at REAL, PRIMARY KEY (grp, key))`` plus an index on
    ``at`` for :meth:`~SqliteInbox.purge`. ``at`` is the Unix time the key was recorded.
    The store only ever adds this table and index: in transactional mode the file may (and
    usually does) hold the handler's own tables too.

Connections and threads
    * :meth:`~SqliteInbox.seen` (the hot path, once per message) runs *inline* on a read-only
      connection. In WAL mode a reader never waits for writers, and a primary-key lookup takes
      a few microseconds, far less than a hop to a worker thread. If SQLite still reports the
      file busy (rare: WAL recovery by another process), the lookup is retried with short
      sleeps that yield to the event loop.
    * Every write (:meth:`~SqliteInbox.record`, :meth:`~SqliteInbox.purge`, the claim and the
      commit of :meth:`~SqliteInbox.transaction`) runs in an anyio worker thread, one at a time,
      on one writer connection. SQLite allows one writer per file anyway; in this process an
      :class:`anyio.Lock` serialises them, across processes ``BEGIN IMMEDIATE`` waits up to
      ``busy_timeout`` seconds for the other writer.

Durability
    The file is in WAL mode. ``synchronous="normal"`` (the default) makes a recorded key
    survive a crash of the process but not necessarily a power cut or OS crash (WAL frames are
    fsync'd at checkpoints, not at each commit). Losing the last records to a power cut only
    means those messages may be handled once more (at-least-once still holds); choose
    ``synchronous="full"`` to fsync every commit.

Transactional mode
    :meth:`~SqliteInbox.transaction` yields the writer :class:`sqlite3.Connection` (autocommit
    mode, ``isolation_level=None``, inside an open ``BEGIN IMMEDIATE``). The handler's writes
    through it are plain synchronous ``sqlite3`` calls on the event loop thread: keep them
    short (a few statements are microseconds), and never call ``commit()``/``rollback()`` or
    ``BEGIN`` on it -- the store commits the claim and the writes together when the handler
    returns, and rolls both back if it raises. While a transaction is open, this store's other
    writes (``record``/``purge``, other transactions) wait for it: transactional handlers on one
    SQLite file run one at a time, as SQLite's single writer requires.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Literal, TypeVar

import anyio
import anyio.to_thread
import msgspec

from herald.inbox.base import DEFAULT_RETENTION, InboxStore
from herald.transports.base import TransportError

__all__ = ["SqliteInbox"]

T = TypeVar("T")

_TABLE = "herald_inbox"
_SCHEMA = (
    f"CREATE TABLE IF NOT EXISTS {_TABLE} ("
    " grp TEXT NOT NULL, key TEXT NOT NULL, at REAL NOT NULL, PRIMARY KEY (grp, key)"
    ") WITHOUT ROWID",
    f"CREATE INDEX IF NOT EXISTS {_TABLE}_at ON {_TABLE} (at)",
)
_SEEN = f"SELECT 1 FROM {_TABLE} WHERE grp = ? AND key = ?"
_INSERT = f"INSERT INTO {_TABLE} (grp, key, at) VALUES (?, ?, ?) ON CONFLICT DO NOTHING"
# A whole batch in one statement with one bound value: about half the cost of executemany.
# ("WHERE true" settles SQLite's INSERT ... SELECT ... ON CONFLICT parsing ambiguity.)
_INSERT_JSON = (
    f"INSERT INTO {_TABLE} (grp, key, at) SELECT ?, value, ? FROM json_each(?) WHERE true"
    " ON CONFLICT DO NOTHING"
)
_PURGE = f"DELETE FROM {_TABLE} WHERE at < ?"

_READ_RETRY_SLEEP = 0.002  # seconds between inline lookups of a file reported busy


class SqliteInbox(InboxStore):
    """An :class:`~herald.inbox.InboxStore` in the SQLite file ``path``.

    :param path: the database file; its directory must exist, the file is created on
        :meth:`open`. ``":memory:"`` is refused (the store uses two connections, which would
        see two different databases).
    :param retention: seconds a record is kept; :meth:`purge` deletes older ones.
    :param synchronous: ``"normal"`` (default: durable against process crashes) or
        ``"full"`` (fsync every commit: durable against power cuts too).
    :param busy_timeout: seconds a write waits for another process's write transaction
        before failing with :class:`~herald.TransportError`.

    :meth:`open` may be called by several users (one per consumer group sharing the store);
    the connections are released when the last of them calls :meth:`close`.
    """

    def __init__(
        self,
        path: str,
        *,
        retention: float = DEFAULT_RETENTION,
        synchronous: Literal["normal", "full"] = "normal",
        busy_timeout: float = 5.0,
    ) -> None:
        if not isinstance(path, str) or not path or path == ":memory:" or path.startswith("file:"):
            raise ValueError(f"SqliteInbox needs a file path, got {path!r}")
        if synchronous not in ("normal", "full"):
            raise ValueError(f"synchronous must be 'normal' or 'full', got {synchronous!r}")
        if retention <= 0:
            raise ValueError("retention must be positive")
        self.path = path
        self.retention = retention
        self.synchronous = synchronous
        self.busy_timeout = busy_timeout
        self._writer: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None
        self._json = True  # SQLite has json_each (found out on open)
        # _lock: owns the writer connection (held across a transaction's body, which awaits);
        # _limiter: keeps this store's blocking calls to one worker thread.
        self._lock = anyio.Lock()
        self._limiter = anyio.CapacityLimiter(1)

    def __repr__(self) -> str:
        return f"SqliteInbox({self.path!r})"

    # --- lifecycle -------------------------------------------------------------------------

    async def _acquire(self) -> None:
        """Open both connections and create the table if missing (safe from several
        processes at once). Raise :class:`~herald.TransportError` naming the path if the file
        cannot be created or written."""
        self._writer, self._reader = await anyio.to_thread.run_sync(
            self._connect, limiter=self._limiter
        )

    async def _release(self) -> None:
        # wait for a running write (or transaction) so none is cut off half done
        async with self._lock:
            writer, reader = self._writer, self._reader
            self._writer = self._reader = None
            if writer is not None and reader is not None:
                await anyio.to_thread.run_sync(_close_both, writer, reader)

    def _connect(self) -> tuple[sqlite3.Connection, sqlite3.Connection]:
        directory = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(directory):
            raise TransportError(
                f"cannot open sqlite inbox {self.path!r}: directory {directory!r} does not exist"
            )
        writer: sqlite3.Connection | None = None
        reader: sqlite3.Connection | None = None
        try:
            writer = sqlite3.connect(
                self.path,
                timeout=self.busy_timeout,
                isolation_level=None,  # we issue BEGIN IMMEDIATE / COMMIT ourselves
                check_same_thread=False,  # worker threads and (in transactions) the loop
            )
            # WAL: the inline reader never waits for a writer (ours or another process's)
            self._enable_wal(writer)
            writer.execute(f"PRAGMA synchronous = {self.synchronous.upper()}")
            writer.execute("BEGIN IMMEDIATE")  # serialises concurrent creators
            try:
                for statement in _SCHEMA:
                    writer.execute(statement)
                writer.execute("COMMIT")
            except BaseException:
                if writer.in_transaction:
                    writer.execute("ROLLBACK")
                raise
            # timeout=0: an inline lookup must never block the event loop in SQLite's busy
            # handler; seen() retries with async sleeps instead.
            reader = sqlite3.connect(
                self.path, timeout=0, isolation_level=None, check_same_thread=False
            )
            reader.execute("PRAGMA query_only = ON")
            try:  # built in since SQLite 3.38; older builds may lack it
                writer.execute("SELECT count(*) FROM json_each('[]')")
            except sqlite3.OperationalError:
                self._json = False
            return writer, reader
        except BaseException as exc:
            for conn in (reader, writer):
                if conn is not None:
                    conn.close()
            if isinstance(exc, sqlite3.Error):
                raise self._error(exc, "open") from exc
            raise

    def _enable_wal(self, conn: sqlite3.Connection) -> None:
        # Switching to WAL needs an exclusive lock, and SQLite reports a concurrent switch by
        # another connection as "locked" at once, without its busy handler: retry ourselves.
        deadline = time.monotonic() + self.busy_timeout
        while True:
            try:
                if str(conn.execute("PRAGMA journal_mode").fetchone()[0]).lower() != "wal":
                    conn.execute("PRAGMA journal_mode = WAL")
                return
            except sqlite3.OperationalError as exc:
                if not _is_busy(exc) or time.monotonic() >= deadline:
                    raise
            time.sleep(0.005)

    # --- the contract ----------------------------------------------------------------------

    async def seen(self, group: str, key: str) -> bool:
        """Whether ``key`` is recorded for ``group``: an inline primary-key lookup.

        Sees every record this store committed before the call, and every record of other
        connections committed before the current event-loop iteration began (see
        :meth:`_begin_snapshot`).
        """
        deadline = 0.0
        while True:
            reader = self._reader
            if reader is None:
                raise self._not_open()
            try:
                if not reader.in_transaction:
                    self._begin_snapshot(reader)
                return reader.execute(_SEEN, (group, key)).fetchone() is not None
            except sqlite3.OperationalError as exc:
                _end_snapshot(reader)
                if not _is_busy(exc):
                    raise self._error(exc, "lookup") from exc
                now = time.monotonic()
                if not deadline:
                    deadline = now + self.busy_timeout
                elif now >= deadline:
                    raise self._error(exc, "lookup") from exc
            await anyio.sleep(_READ_RETRY_SLEEP)

    def _begin_snapshot(self, reader: sqlite3.Connection) -> None:
        # Starting and ending a read transaction per lookup is about half of its cost (WAL
        # read locks). So lookups share one read transaction until the event loop has run
        # everything ready now: a batch of deliveries is looked up in one snapshot, which ends
        # before the loop waits for I/O, so no fetch can return a delivery that is newer than
        # the snapshot it is looked up in. Our own writes end the snapshot at once
        # (_after_write), so seen() always reflects this store's records. Off asyncio, every
        # lookup is a transaction of its own.
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        reader.execute("BEGIN")
        loop.call_soon(_end_snapshot, reader)

    def _after_write(self) -> None:
        reader = self._reader
        if reader is not None:
            _end_snapshot(reader)

    async def record(self, group: str, keys: Sequence[str]) -> None:
        """Record ``keys`` in one transaction (committed when this returns)."""
        if not keys:
            return
        at = time.time()
        if self._json:
            args = (group, at, msgspec.json.encode(list(keys)).decode())
            await self._write("record", lambda c: c.execute(_INSERT_JSON, args))
        else:
            rows = [(group, k, at) for k in keys]
            await self._write("record", lambda c: c.executemany(_INSERT, rows))

    @asynccontextmanager
    async def transaction(self, group: str, key: str) -> AsyncIterator[sqlite3.Connection | None]:
        """Claim ``key`` in a ``BEGIN IMMEDIATE`` transaction on the writer connection.

        Yields that connection if the key was new, or ``None`` (after rolling back) if it was
        already recorded. A clean exit commits the claim and the handler's writes; an exception
        (or cancellation) rolls both back. See the module docs for what the handler may do with
        the connection.
        """
        async with self._lock:
            conn = self._writer
            if conn is None:
                raise self._not_open()
            at = time.time()
            claimed = await self._run(self._claim, conn, group, key, at)
            if not claimed:
                yield None
                return
            try:
                yield conn
            except BaseException:
                # shielded: a cancelled handler must not leave the writer inside a transaction
                with anyio.CancelScope(shield=True):
                    await self._run(_rollback, conn)
                raise
            with anyio.CancelScope(shield=True):
                try:
                    await self._run(_commit, conn)
                except sqlite3.Error as exc:
                    await self._run(_rollback, conn)
                    raise self._error(exc, "commit") from exc
                finally:
                    self._after_write()

    def _claim(self, conn: sqlite3.Connection, group: str, key: str, at: float) -> bool:
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                claimed = conn.execute(_INSERT, (group, key, at)).rowcount == 1
                if not claimed:
                    conn.execute("ROLLBACK")
                return claimed
            except BaseException:
                _rollback(conn)
                raise
        except sqlite3.Error as exc:
            raise self._error(exc, "claim") from exc

    async def purge(self) -> int:
        """Delete records older than ``retention`` seconds; return how many."""
        cutoff = time.time() - self.retention
        return await self._write("purge", lambda c: c.execute(_PURGE, (cutoff,)).rowcount)

    # --- plumbing --------------------------------------------------------------------------

    async def _write(self, action: str, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` in one write transaction in the worker thread; committed on return."""
        async with self._lock:
            conn = self._writer
            if conn is None:
                raise self._not_open()
            try:
                return await self._run(self._transact, conn, action, fn)
            finally:
                self._after_write()

    def _transact(self, conn: sqlite3.Connection, action: str, fn: Callable[..., T]) -> T:
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = fn(conn)
                conn.execute("COMMIT")
                return result
            except BaseException:
                _rollback(conn)
                raise
        except sqlite3.Error as exc:
            raise self._error(exc, action) from exc

    async def _run(self, fn: Callable[..., T], *args: object) -> T:
        # Not abandoned on cancellation: the caller waits for the thread, so a transaction
        # is never left half done.
        return await anyio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    def _not_open(self) -> TransportError:
        return TransportError(f"sqlite inbox {self.path!r} is not open; call open() first")

    def _error(self, exc: sqlite3.Error, action: str) -> TransportError:
        text = str(exc)
        hint = ""
        if _is_busy(exc):
            hint = f" (still locked after busy_timeout={self.busy_timeout:g}s)"
        elif "unable to open" in text or "readonly" in text:
            hint = " (check that the file and its directory are writable)"
        elif "not a database" in text:
            hint = " (the file exists but is not a SQLite database)"
        return TransportError(f"sqlite inbox {action} failed on {self.path!r}: {text}{hint}")


def _is_busy(exc: sqlite3.Error) -> bool:
    text = str(exc)
    return "locked" in text or "busy" in text


def _end_snapshot(reader: sqlite3.Connection) -> None:
    try:
        if reader.in_transaction:
            reader.execute("COMMIT")
    except sqlite3.ProgrammingError:
        pass  # closed meanwhile: closing ended the read transaction


def _commit(conn: sqlite3.Connection) -> None:
    conn.execute("COMMIT")


def _rollback(conn: sqlite3.Connection) -> None:
    if conn.in_transaction:
        conn.execute("ROLLBACK")


def _close_both(writer: sqlite3.Connection | None, reader: sqlite3.Connection) -> None:
    reader.close()
    if writer is not None:
        writer.close()
