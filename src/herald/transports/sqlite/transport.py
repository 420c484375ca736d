"""The embedded durable broker: messages, consumer groups and leases in one SQLite file.

Nothing to install or start: several worker *processes* can share one database file, each group
of them competing for the messages of a topic, while every group gets every message.

URL
    ``sqlite:///relative/path.db`` (relative to the working directory) or
    ``sqlite:////absolute/path.db``. The directory must exist; the file is created on connect.
    ``:memory:`` is refused: an in-memory database cannot be shared between processes, use
    ``memory://`` for that.

Query options
    ``visibility_timeout`` (seconds, default 30)
        How long a fetched but not yet acked delivery stays leased to its consumer. If the
        consumer dies, the message goes to another member of the group after this long.
    ``synchronous`` (``full`` default, or ``normal``)
        ``full`` fsyncs every commit: a published message survives a power cut. ``normal`` only
        survives a crash of the process (WAL is fsync'd at checkpoints); faster on slow disks.
    ``poll_interval`` (seconds, default 0.05)
        The longest a waiting :meth:`~SqliteSubscription.fetch` sleeps before looking for
        messages written by *other* processes (a cheap read that takes no lock). Publishes,
        nacks and closes from this transport wake it at once.
    ``busy_timeout`` (seconds, default 5)
        How long to wait for another process's write transaction before failing with
        :class:`~herald.transports.base.TransportError`.

Schema (the wire format; version 1 in ``PRAGMA user_version``)
    ``messages(seq INTEGER PRIMARY KEY AUTOINCREMENT, topic, id, key, type, headers, payload,
    published_at)``: the log. ``headers`` is a JSON object of strings (or NULL), ``payload`` a
    BLOB, ``published_at`` Unix seconds. A plain client publishes with
    ``INSERT INTO messages(topic, payload) VALUES ('orders', x'7b7d')`` (``id`` and
    ``published_at`` have defaults) and reads with ``SELECT * FROM messages WHERE topic = ?``.

    ``groups(topic, grp, cursor, next_visible)``: each group's position; messages with
    ``seq > cursor`` were never handed to the group. ``next_visible`` is a lower bound of the
    group's earliest lease ``visible_at`` (NULL: no lease), so fetch only scans leases when one
    may be due.

    ``leases(topic, grp, seq, attempt, visible_at, owner)``: messages handed to a group and not
    acked. ``owner`` is the random id of the subscription holding the lease (0: nobody, waiting
    for redelivery at ``visible_at``). ``attempt`` is the attempt of the last delivery; every
    redelivery adds one.

Semantics
    * publish: one transaction and one (fsync'd, with ``synchronous=full``) commit per batch.
    * fetch: in one ``BEGIN IMMEDIATE`` transaction, re-lease leases whose ``visible_at`` has
      passed (expired consumers, nacks, closed subscriptions), then lease new messages after
      the group's cursor and advance it. Redeliveries come first, new messages in ``seq``
      (publish) order.
    * ack: durable when it returns (deletes the leases). Acks from concurrent callers are
      group-committed: those arriving while a commit runs share the next one. An ack that
      comes after the lease expired *and* another consumer took the message does not take it
      back from that consumer: the message is handled twice (at-least-once).
    * nack(delay): written at once; the delay lives in the database, so it survives restarts.
    * A group's messages are deleted (about once a second, by fetching consumers) once every
      group of the topic has read past them and no lease holds them. Topics that no group has
      joined keep their messages, so publishing before subscribing loses nothing.

Limits: one writer at a time (SQLite), so throughput does not grow with more processes; a
group that is never used again keeps its topic's messages forever; processes sharing a file
must agree on the wall clock (lease times are Unix times); SQLite caps a row (so a payload)
at 1 GB by default; the file must be on a local disk (WAL needs shared memory).
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from functools import lru_cache
from typing import Any, ClassVar, TypeVar

import anyio
import anyio.to_thread
import msgspec

from herald.message import Message
from herald.transports.base import (
    Features,
    GroupInfo,
    PermanentTransportError,
    Start,
    TopicInfo,
    Transport,
    TransportError,
    check_peek,
    check_topology,
    unsupported,
    validate_name,
)
from herald.transports.sqlite import listing, peek
from herald.transports.sqlite.options import SqliteOptions, parse_sqlite_url
from herald.transports.sqlite.subscription import SqliteSubscription

__all__ = ["SqliteSubscription", "SqliteTransport"]

T = TypeVar("T")

_SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    topic        TEXT NOT NULL,
    id           TEXT NOT NULL DEFAULT (lower(hex(randomblob(16)))),
    key          TEXT,
    type         TEXT,
    headers      TEXT,
    payload      BLOB NOT NULL,
    published_at REAL NOT NULL DEFAULT ((julianday('now') - 2440587.5) * 86400.0)
);
CREATE INDEX IF NOT EXISTS messages_topic ON messages (topic);
CREATE TABLE IF NOT EXISTS groups (
    topic        TEXT NOT NULL,
    grp          TEXT NOT NULL,
    cursor       INTEGER NOT NULL,
    next_visible REAL,
    PRIMARY KEY (topic, grp)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS leases (
    topic      TEXT NOT NULL,
    grp        TEXT NOT NULL,
    seq        INTEGER NOT NULL,
    attempt    INTEGER NOT NULL,
    visible_at REAL NOT NULL,
    owner      INTEGER NOT NULL,
    PRIMARY KEY (topic, grp, seq)
) WITHOUT ROWID;
"""

#: Rows per INSERT statement when publishing (7 parameters each, far below SQLite's limit).
_INSERT_ROWS = 100

_encode_headers = msgspec.json.Encoder().encode


class SqliteTransport(Transport):
    """A durable broker in a SQLite file, shared by every process that opens the same path.

    All database work runs in a worker thread, one operation at a time per transport (one
    connection), so the event loop never blocks on disk.
    """

    schemes: ClassVar[tuple[str, ...]] = ("sqlite",)
    features = Features(
        persistent=True,
        cross_process=True,
        ordered_per_key=True,
        native_delay=True,
        replay=True,
        headers=True,
        max_payload=None,  # SQLite's own BLOB limit (1 GB by default) is far above anything sane
        transactions=True,  # publish and ack share one database transaction
        listing=True,
    )

    def __init__(self, options: SqliteOptions, url: str) -> None:
        self._options = options
        self._url = url
        self._conn: sqlite3.Connection | None = None
        self._limiter = anyio.CapacityLimiter(1)
        self._subscriptions: set[SqliteSubscription] = set()
        #: Set (and replaced) when this process makes something fetchable on a topic.
        self._events: dict[str, anyio.Event] = {}
        #: topic -> (time of the last cleanup, messages leased since), touched by fetches.
        self._cleanup_due: dict[str, tuple[float, int]] = {}
        self._closed = False
        #: bumped by close(): a connect() that was opening meanwhile drops its connection
        self._generation = 0

    @classmethod
    def from_url(cls, url: str) -> SqliteTransport:
        return cls(parse_sqlite_url(url), url)

    @property
    def url(self) -> str:
        return self._url  # a sqlite URL carries no password

    @property
    def path(self) -> str:
        """The database file, as given in the URL."""
        return self._options.path

    # --- lifecycle -------------------------------------------------------------------------

    async def connect(self) -> None:
        """Open (creating if needed) the database. Raise :class:`PermanentTransportError`
        naming the path if it cannot be opened (missing directory, a directory, not writable),
        is not a SQLite database or not a Herald one; :class:`TransportError` if it stays
        locked past ``busy_timeout``. After :meth:`close` it opens the database again."""
        if self._conn is None:
            self._closed = False
            generation = self._generation
            conn = await anyio.to_thread.run_sync(self._open, limiter=self._limiter)
            if self._conn is None and self._generation == generation:
                self._conn = conn
            else:  # a concurrent connect() won, or close() ran meanwhile
                await anyio.to_thread.run_sync(conn.close, limiter=self._limiter)

    def _open(self) -> sqlite3.Connection:
        opts = self._options
        directory = os.path.dirname(os.path.abspath(opts.path))
        if not os.path.isdir(directory):
            raise PermanentTransportError(
                f"cannot open sqlite database {opts.path!r}: directory {directory!r} does not exist"
            )
        conn: sqlite3.Connection | None = None
        try:
            conn = sqlite3.connect(
                opts.path,
                timeout=opts.busy_timeout,
                isolation_level=None,  # we issue BEGIN IMMEDIATE / COMMIT ourselves
                check_same_thread=False,  # used from anyio worker threads, one at a time
            )
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise PermanentTransportError(
                    f"sqlite database {opts.path!r} cannot use WAL mode (got {mode!r}); "
                    "is it on a network file system?"
                )
            conn.execute(f"PRAGMA synchronous = {opts.synchronous.upper()}")
            # Index pages of the log and leases stay hot; 16 MB costs little and saves reads.
            conn.execute("PRAGMA cache_size = -16000")
            conn.execute("PRAGMA temp_store = MEMORY")
            if conn.execute("PRAGMA user_version").fetchone()[0] != _SCHEMA_VERSION:
                self._create_schema(conn)
            return conn
        except BaseException as exc:
            if conn is not None:
                conn.close()
            if isinstance(exc, sqlite3.Error):
                raise self._error(exc, "open") from exc
            raise

    def _create_schema(self, conn: sqlite3.Connection) -> None:
        path = self._options.path
        conn.execute("BEGIN IMMEDIATE")
        try:
            # Read again under the write lock: another process may have just created it.
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, _SCHEMA_VERSION):
                raise PermanentTransportError(
                    f"sqlite database {path!r} has Herald schema version {version}; "
                    f"this Herald reads version {_SCHEMA_VERSION}"
                )
            if version == 0:
                names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
                if names - {"messages", "groups", "leases", "sqlite_sequence", "messages_topic"}:
                    raise PermanentTransportError(
                        f"sqlite database {path!r} already holds other tables; "
                        "give Herald a file of its own"
                    )
                # One statement at a time: executescript() would commit our transaction.
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    async def close(self) -> None:
        """Close every subscription (returning their unacked deliveries), then the database."""
        if self._closed:
            return
        self._closed = True
        self._generation += 1
        try:
            errors: list[TransportError] = []
            for sub in list(self._subscriptions):
                try:
                    await sub.close()
                except TransportError as exc:  # close the others and the file regardless
                    errors.append(exc)
            if errors:
                raise errors[0]
        finally:
            events, self._events = self._events, {}
            for event in events.values():
                event.set()
            conn, self._conn = self._conn, None
            if conn is not None:
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(conn.close, limiter=self._limiter)

    # --- plumbing --------------------------------------------------------------------------

    def _error(self, exc: sqlite3.Error, action: str) -> TransportError:
        text = str(exc)
        hint = ""
        if "locked" in text or "busy" in text:
            hint = (
                f" (still locked after busy_timeout={self._options.busy_timeout:g}s: another "
                "connection holds a long write transaction)"
            )
        elif "not a database" in text or "unable to open" in text or "readonly" in text:
            # the file is not a database, a directory, or not writable: retrying cannot help
            hint = (
                " (the file exists but is not a SQLite database)"
                if "not a database" in text
                else " (check that the path is a file and it and its directory are writable)"
            )
            return PermanentTransportError(f"sqlite {action} failed on {self.path!r}: {text}{hint}")
        return TransportError(f"sqlite {action} failed on {self.path!r}: {text}{hint}")

    def _check_connected(self) -> None:
        if self._conn is None:
            state = "closed" if self._closed else "not connected; call connect() first"
            raise TransportError(f"sqlite transport for {self.path!r} is {state}")

    async def _transact(self, action: str, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` in one write transaction in the worker thread. Never abandoned: a
        cancelled caller waits for the transaction to finish, so none is left half done."""
        self._check_connected()
        return await anyio.to_thread.run_sync(self._write, action, fn, limiter=self._limiter)

    def _write(self, action: str, fn: Callable[[sqlite3.Connection], T]) -> T:
        """In the worker thread: run ``fn`` in one ``BEGIN IMMEDIATE`` transaction."""
        conn = self._conn
        if conn is None:
            raise TransportError(f"sqlite transport for {self.path!r} is closed")
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = fn(conn)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise self._error(exc, action) from exc
        return result

    async def _read(self, action: str, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` (plain reads, no transaction) in the worker thread."""
        self._check_connected()
        return await anyio.to_thread.run_sync(self._run_read, action, fn, limiter=self._limiter)

    def _run_read(self, action: str, fn: Callable[[sqlite3.Connection], T]) -> T:
        conn = self._conn
        if conn is None:
            raise TransportError(f"sqlite transport for {self.path!r} is closed")
        try:
            return fn(conn)
        except sqlite3.Error as exc:
            raise self._error(exc, action) from exc

    def _event(self, topic: str) -> anyio.Event:
        event = self._events.get(topic)
        if event is None:
            event = self._events[topic] = anyio.Event()
        return event

    def _notify(self, topic: str) -> None:
        event = self._events.pop(topic, None)
        if event is not None:
            event.set()

    def _probe(self, topic: str, group: str) -> bool:
        """In the worker thread: may ``group`` have something to fetch now? A plain read, so
        idle consumers polling for other processes' messages never take the write lock."""
        conn = self._conn
        if conn is None:
            raise TransportError(f"sqlite transport for {self.path!r} is closed")
        try:
            row = conn.execute(
                "SELECT cursor < (SELECT coalesce(max(seq), 0) FROM messages WHERE topic = ?)"
                " OR coalesce(next_visible <= ?, 0) FROM groups WHERE topic = ? AND grp = ?",
                (topic, time.time(), topic, group),
            ).fetchone()
        except sqlite3.Error as exc:
            raise self._error(exc, "poll") from exc
        return row is None or bool(row[0])  # no group row: let fetch report it

    # --- publish / subscribe ---------------------------------------------------------------

    async def publish(self, topic: str, messages: Sequence[Message]) -> None:
        """Append ``messages`` to ``topic`` in one transaction; return after the commit."""
        validate_name("topic", topic)
        if not messages:
            return
        await self._transact("publish", lambda c: self._insert(c, topic, messages))
        self._notify(topic)

    @staticmethod
    def _insert(conn: sqlite3.Connection, topic: str, messages: Sequence[Message]) -> None:
        now = time.time()
        params: list[Any] = []
        append = params.extend
        for m in messages:
            headers = _encode_headers(m.headers).decode() if m.headers else None
            append((topic, m.id, m.key, m.type, headers, m.payload, now))
        # Multi-row VALUES: ~30% cheaper per row than executemany, which steps once per row.
        width = _INSERT_ROWS * 7
        for start in range(0, len(params), width):
            chunk = params[start : start + width]
            conn.execute(_insert_sql(len(chunk) // 7), chunk)

    async def subscribe(
        self,
        topic: str,
        group: str,
        *,
        start: Start = "earliest",
        bind: Sequence[str] = (),
        source: str | None = None,
    ) -> SqliteSubscription:
        """Join ``group`` on ``topic``. A new group starts at the oldest retained message
        (``"earliest"``) or after the newest one (``"latest"``); an existing one resumes.

        ``bind`` and ``source`` raise ``ValueError``: a row has no routing address, and a
        plain ``INSERT INTO messages(topic, payload)`` naming the topic is consumed as it is."""
        validate_name("topic", topic)
        validate_name("group", group)
        bind, source = check_topology(bind, source)
        if bind:
            raise unsupported("sqlite", "bind", "a row has no routing key; use filter=")
        if source is not None:
            raise unsupported(
                "sqlite",
                "source",
                "the topic is the messages.topic column, so a plain INSERT naming the topic is "
                "consumed as it is",
            )
        if start not in ("earliest", "latest"):
            raise ValueError(f"start must be 'earliest' or 'latest', not {start!r}")

        def create(conn: sqlite3.Connection) -> None:
            # Under BEGIN IMMEDIATE no publish can slip between reading the end and inserting.
            conn.execute(
                "INSERT OR IGNORE INTO groups (topic, grp, cursor) VALUES (?, ?, "
                "CASE WHEN ? THEN (SELECT coalesce(max(seq), 0) FROM messages) ELSE 0 END)",
                (topic, group, start == "latest"),
            )

        await self._transact("subscribe", create)
        sub = SqliteSubscription(self, topic, group)
        self._subscriptions.add(sub)
        return sub

    def peek(
        self, topic: str, *, last: int = 0
    ) -> AbstractAsyncContextManager[AsyncIterator[Message]]:
        """``SELECT`` by ``seq``: the ``last`` newest retained messages, then each new one (see
        :mod:`herald.transports.sqlite.peek`)."""
        check_peek(self, topic, last)
        self._check_connected()
        return peek.peek(self, topic, last)

    async def list_topics(self) -> list[TopicInfo]:
        return await self._read("list topics", listing.topics)

    async def list_groups(self, topic: str) -> list[GroupInfo]:
        validate_name("topic", topic)
        return await self._read("list groups", lambda c: listing.groups(c, topic))

    async def delete_topic(self, topic: str) -> None:
        """Delete ``topic``'s messages, groups and leases in one transaction (tests and
        tooling). A consumer still subscribed to it gets a TransportError on its next fetch."""
        validate_name("topic", topic)

        def drop(conn: sqlite3.Connection) -> None:
            for table in ("leases", "groups", "messages"):
                conn.execute(f"DELETE FROM {table} WHERE topic = ?", (topic,))

        await self._transact("delete_topic", drop)
        self._cleanup_due.pop(topic, None)
        self._notify(topic)


@lru_cache(maxsize=_INSERT_ROWS)
def _insert_sql(rows: int) -> str:
    return (
        "INSERT INTO messages (topic, id, key, type, headers, payload, published_at) VALUES "
        + ",".join(["(?, ?, ?, ?, ?, ?, ?)"] * rows)
    )
