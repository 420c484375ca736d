"""One consumer's membership of a group in the SQLite broker: fetch, ack, nack, close.

The semantics and the schema are documented in :mod:`herald.transports.sqlite.transport`.
"""

from __future__ import annotations

import math
import secrets
import sqlite3
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, Protocol, TypeVar

import anyio
import msgspec

from herald.message import Message
from herald.transports.base import Delivery, Subscription, TransportError, by_topic
from herald.transports.sqlite.options import SqliteOptions

__all__ = ["COLUMNS", "Owner", "SqliteSubscription", "row_message"]

#: The columns of a message row, as :func:`row_message` reads them.
COLUMNS = "seq, id, key, type, headers, payload"
_COLUMNS = COLUMNS
_COLUMNS_M = "m.seq, m.id, m.key, m.type, m.headers, m.payload"
#: Fully consumed messages of a topic are deleted by a fetch once this many seconds or this
#: many leased messages have passed since the last deletion (per transport). Often enough
#: that the log stays small and cache-friendly, rarely enough to cost ~nothing per fetch.
_CLEANUP_INTERVAL = 1.0
_CLEANUP_EVERY = 20_000

_decode_headers = msgspec.json.Decoder(dict[str, str]).decode


def _ack_runs(acked: list[int], held: list[int]) -> list[tuple[int, int]]:
    """Group acked seqs into ``(first, last)`` ranges that contain no seq still ``held``.

    Each range is deleted with one ``seq BETWEEN`` statement (several times cheaper than one
    delete per row). Restricted to this subscription's ``owner``, a range cannot touch another
    consumer's lease, and it must not cover a lease this subscription still holds unacked.
    Both lists must be sorted.
    """
    runs: list[tuple[int, int]] = []
    j, n_held = 0, len(held)
    first = last = -1
    for seq in acked:
        crossed = False
        while j < n_held and held[j] < seq:
            crossed = True
            j += 1
        if first >= 0 and not crossed:
            last = seq
            continue
        if first >= 0:
            runs.append((first, last))
        first = last = seq
    if first >= 0:
        runs.append((first, last))
    return runs


T = TypeVar("T")


class Owner(Protocol):
    """What a subscription uses of the transport that made it: its connection, worker-thread
    limiter and wake-up events. The transport module imports this one, so this one names
    these members instead of importing the transport class."""

    @property
    def path(self) -> str: ...

    @property
    def _options(self) -> SqliteOptions: ...

    @property
    def _conn(self) -> sqlite3.Connection | None:
        """None while not connected."""
        ...

    @property
    def _limiter(self) -> anyio.CapacityLimiter:
        """The one worker thread every use of the connection runs in."""
        ...

    @property
    def _subscriptions(self) -> set[SqliteSubscription]:
        """The transport's open subscriptions; a closing one removes itself."""
        ...

    @property
    def _cleanup_due(self) -> dict[str, tuple[float, int]]:
        """topic -> (time of the last cleanup, messages leased since)."""
        ...

    def _check_connected(self) -> None: ...

    async def _transact(self, action: str, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` in one write transaction in the worker thread."""
        ...

    def _event(self, topic: str) -> anyio.Event:
        """Set (once) when this process next makes something fetchable on ``topic``."""
        ...

    def _notify(self, topic: str) -> None: ...

    def _probe(self, topic: str, group: str) -> bool:
        """In the worker thread: may ``group`` have something to fetch now?"""
        ...

    def _insert(self, conn: sqlite3.Connection, topic: str, messages: Sequence[Message]) -> None:
        """Append ``messages`` to ``topic`` inside the caller's transaction."""
        ...


class SqliteSubscription(Subscription):
    """One consumer of ``group`` on ``topic``; competes with the group's other consumers."""

    def __init__(self, transport: Owner, topic: str, group: str) -> None:
        self.topic = topic
        self.group = group
        self._t = transport
        #: Written into the leases this consumer holds; random so processes never collide.
        self._owner = secrets.randbits(62) + 1
        #: seq -> attempt of deliveries handed out and not yet acked or nacked.
        self._held: dict[int, int] = {}
        #: Acked seqs waiting for the next group commit, and the commit bookkeeping: acks
        #: added while ``_ack_epoch == e`` are durable once ``_acks_durable > e``.
        self._acks: list[int] = []
        self._ack_epoch = 0
        self._acks_durable = 0
        self._ack_lock = anyio.Lock()
        self._closed = False

    def _check_open(self) -> None:
        if self._closed:
            raise TransportError(
                f"subscription {self.group!r} on {self.topic!r} ({self._t.path!r}) is closed"
            )

    def _take_acks(self) -> tuple[list[int], list[tuple[int, int]]]:
        """Detach the ack buffer and turn it into delete ranges (on the event loop thread)."""
        acks, self._acks = self._acks, []
        if not acks:
            return acks, []
        acks.sort()
        return acks, _ack_runs(acks, sorted(self._held))

    def _delete_acked(self, conn: sqlite3.Connection, runs: list[tuple[int, int]]) -> None:
        if runs:
            conn.executemany(
                "DELETE FROM leases WHERE topic = ? AND grp = ? AND seq BETWEEN ? AND ?"
                " AND owner = ?",
                [(self.topic, self.group, lo, hi, self._owner) for lo, hi in runs],
            )

    # --- fetch -----------------------------------------------------------------------------

    async def fetch(self, max_messages: int, timeout: float) -> list[Delivery]:
        """Lease up to ``max_messages`` messages: due redeliveries first, then new ones in
        publish order. Waits up to ``timeout`` seconds for the first; ``[]`` on timeout."""
        if max_messages < 1:
            raise ValueError(f"max_messages must be >= 1, not {max_messages!r}")
        self._check_open()
        t = self._t
        deadline = anyio.current_time() + max(0.0, timeout)
        while True:
            # Taken before the query: a publish committed while it runs still wakes us.
            event = t._event(self.topic)
            deliveries, next_visible = await t._transact(
                "fetch", partial(self._fetch_txn, limit=max_messages)
            )
            # No await between here and return: whatever was leased reaches the caller. If
            # the caller is cancelled anyway, the leases carry our owner id and close()
            # releases them (or they expire).
            for d in deliveries:
                self._held[d.token] = d.attempt
            if deliveries or self._closed:
                return deliveries
            if not await self._wait(event, deadline, next_visible):
                return []

    async def _wait(self, event: anyio.Event, deadline: float, next_visible: float | None) -> bool:
        """Sleep until something may be fetchable; False when ``deadline`` passed first."""
        backoff = 0.001
        while True:
            remaining = deadline - anyio.current_time()
            if remaining <= 0:
                return False
            wait = min(backoff, remaining)
            if next_visible is not None:
                wait = min(wait, max(0.0, next_visible - time.time()))
            with anyio.move_on_after(wait):
                await event.wait()
            if self._closed:
                return False
            if event.is_set():
                return True  # this process published, nacked or closed a subscription
            if next_visible is not None and time.time() >= next_visible:
                return True  # a lease expired or a delayed nack became due
            if anyio.current_time() >= deadline:
                return False
            backoff = min(backoff * 2, self._t._options.poll_interval)
            # Something from another process? A cheap read; a full fetch only if so.
            self._t._check_connected()
            if await anyio.to_thread.run_sync(
                self._t._probe, self.topic, self.group, limiter=self._t._limiter
            ):
                return True

    def _fetch_txn(
        self, conn: sqlite3.Connection, limit: int
    ) -> tuple[list[Delivery], float | None]:
        """In the worker thread, inside BEGIN IMMEDIATE. Returns the deliveries and the
        group's next lease-visibility time (when to look again for redeliveries)."""
        if self._closed:
            return [], None
        topic, group, owner = self.topic, self.group, self._owner
        now = time.time()
        lease_until = now + self._t._options.visibility_timeout
        row = conn.execute(
            "SELECT cursor, next_visible FROM groups WHERE topic = ? AND grp = ?", (topic, group)
        ).fetchone()
        if row is None:
            raise TransportError(
                f"group {group!r} on {topic!r} vanished from {self._t.path!r} (deleted by hand?)"
            )
        cursor: int = row[0]
        next_visible: float | None = row[1]
        out: list[Delivery] = []

        if next_visible is not None and next_visible <= now:
            # Rare path: some lease may be due. Scans the group's leases (in-flight only).
            claimed = conn.execute(
                "UPDATE leases SET attempt = attempt + 1, visible_at = ?, owner = ?"
                " WHERE topic = ? AND grp = ? AND seq IN (SELECT seq FROM leases"
                "  WHERE topic = ? AND grp = ? AND visible_at <= ? ORDER BY seq LIMIT ?)"
                " RETURNING seq, attempt",
                (lease_until, owner, topic, group, topic, group, now, limit),
            ).fetchall()
            next_visible = conn.execute(
                "SELECT min(visible_at) FROM leases WHERE topic = ? AND grp = ?", (topic, group)
            ).fetchone()[0]
            conn.execute(
                "UPDATE groups SET next_visible = ? WHERE topic = ? AND grp = ?",
                (next_visible, topic, group),
            )
            if claimed:
                attempts = dict(claimed)
                # The claimed leases are exactly ours with this fresh visible_at.
                rows = conn.execute(
                    f"SELECT {_COLUMNS_M} FROM leases l JOIN messages m ON m.seq = l.seq"
                    " WHERE l.topic = ? AND l.grp = ? AND l.owner = ? AND l.visible_at = ?"
                    " ORDER BY l.seq",
                    (topic, group, owner, lease_until),
                ).fetchall()
                out.extend(self._deliveries(rows, attempts))
                if len(rows) < len(attempts):  # message deleted by hand: drop its lease
                    gone = set(attempts).difference(r[0] for r in rows)
                    conn.executemany(
                        "DELETE FROM leases WHERE topic = ? AND grp = ? AND seq = ?",
                        [(topic, group, s) for s in gone],
                    )

        if len(out) < limit:
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM messages WHERE topic = ? AND seq > ? ORDER BY seq LIMIT ?",
                (topic, cursor, limit - len(out)),
            ).fetchall()
            if rows:
                last = rows[-1][0]
                # INSERT ... SELECT re-reads the index range in C instead of binding each row.
                conn.execute(
                    "INSERT INTO leases (topic, grp, seq, attempt, visible_at, owner)"
                    " SELECT topic, ?, seq, 1, ?, ? FROM messages"
                    " WHERE topic = ? AND seq > ? AND seq <= ?",
                    (group, lease_until, owner, topic, cursor, last),
                )
                if next_visible is None or lease_until < next_visible:
                    next_visible = lease_until  # keep it a lower bound of every visible_at
                conn.execute(
                    "UPDATE groups SET cursor = ?, next_visible = ? WHERE topic = ? AND grp = ?",
                    (last, next_visible, topic, group),
                )
                out.extend(self._deliveries(rows, None))

        last, count = self._t._cleanup_due.get(topic, (0.0, 0))
        count += len(out)
        if count >= _CLEANUP_EVERY or now - last >= _CLEANUP_INTERVAL:
            _cleanup(conn, topic)
            last, count = now, 0
        self._t._cleanup_due[topic] = (last, count)
        return out, next_visible

    def _deliveries(self, rows: list[Any], attempts: dict[int, int] | None) -> list[Delivery]:
        topic = self.topic
        return [
            Delivery(row_message(topic, row), 1 if attempts is None else attempts[row[0]], row[0])
            for row in rows
        ]

    # --- ack / nack / close ----------------------------------------------------------------

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        """Mark deliveries handled; durable when this returns.

        Group commit: acks from concurrent callers (e.g. one per worker task) that arrive
        while a commit is running are written together by the next one, so per-message acks
        cost far less than one fsync each.
        """
        self._check_open()
        held = self._held
        for d in deliveries:
            if held.pop(d.token, None) is not None:
                self._acks.append(d.token)
        epoch = self._ack_epoch
        async with self._ack_lock:
            if self._acks_durable > epoch:
                return  # a commit that started after our append has already covered us
            await self._commit_acks()

    async def _commit_acks(self) -> None:
        """Write the ack buffer (caller holds ``_ack_lock``)."""
        epoch = self._ack_epoch
        self._ack_epoch += 1
        acks, runs = self._take_acks()
        if runs:
            try:
                await self._t._transact("ack", partial(self._delete_acked, runs=runs))
            except BaseException:
                self._acks[:0] = acks  # keep them for the next commit, which retries
                raise
        self._acks_durable = epoch + 1

    async def commit(self, deliveries: Sequence[Delivery], messages: Sequence[Message]) -> None:
        """Insert ``messages`` and delete the leases of ``deliveries`` in one transaction."""
        self._check_open()
        batches = by_topic(messages)
        held = self._held
        mine = sorted({d.token for d in deliveries if d.token in held})
        taken = set(mine)
        runs = _ack_runs(mine, sorted(s for s in held if s not in taken))
        t = self._t

        def write(conn: sqlite3.Connection) -> None:
            for topic, batch in batches.items():
                t._insert(conn, topic, batch)
            self._delete_acked(conn, runs)

        with anyio.CancelScope(shield=True):  # the caller learns the outcome, whatever it is
            await t._transact("commit", write)
        for seq in mine:
            held.pop(seq, None)
        for topic in batches:
            t._notify(topic)

    async def nack(self, delivery: Delivery, delay: float = 0.0) -> None:
        """Give the delivery back: redelivered to the group after ``delay`` seconds with
        ``attempt + 1``. Written at once, so the delay outlives this process."""
        self._check_open()
        if not (delay >= 0 and math.isfinite(delay)):
            raise ValueError(f"nack delay must be a finite number >= 0, not {delay!r}")
        if self._held.pop(delivery.token, None) is None:
            return  # already acked or nacked
        topic, group = self.topic, self.group

        def release(conn: sqlite3.Connection) -> None:
            at = time.time() + delay
            cur = conn.execute(
                "UPDATE leases SET visible_at = ?, owner = 0"
                " WHERE topic = ? AND grp = ? AND seq = ? AND owner = ?",
                (at, topic, group, delivery.token, self._owner),
            )
            if cur.rowcount:
                _lower_next_visible(conn, topic, group, at)

        await self._t._transact("nack", release)
        self._t._notify(topic)  # wake waiting consumers here; they learn the new due time

    async def close(self) -> None:
        """Write buffered acks and hand every unacked delivery back to the group at once."""
        if self._closed:
            return
        self._closed = True
        self._t._subscriptions.discard(self)
        self._t._notify(self.topic)  # a fetch waiting on this subscription returns []
        if self._t._conn is None:
            return
        topic, group = self.topic, self.group

        def leave(conn: sqlite3.Connection) -> None:
            now = time.time()
            # Also catches leases of a fetch that ran concurrently with close().
            cur = conn.execute(
                "UPDATE leases SET visible_at = ?, owner = 0"
                " WHERE topic = ? AND grp = ? AND owner = ?",
                (now, topic, group, self._owner),
            )
            if cur.rowcount:
                _lower_next_visible(conn, topic, group, now)

        with anyio.CancelScope(shield=True):  # leaving half-way would strand the leases
            async with self._ack_lock:
                await self._commit_acks()  # acks first: they must not be released below
            self._held.clear()
            await self._t._transact("close", leave)
        self._t._notify(topic)


def _lower_next_visible(conn: sqlite3.Connection, topic: str, group: str, at: float) -> None:
    conn.execute(
        "UPDATE groups SET next_visible = min(coalesce(next_visible, ?), ?)"
        " WHERE topic = ? AND grp = ?",
        (at, at, topic, group),
    )


def _cleanup(conn: sqlite3.Connection, topic: str) -> None:
    """Delete messages of ``topic`` every group has read past and no lease holds.

    With no group on the topic ``min(cursor)`` is NULL and nothing is deleted.
    """
    conn.execute(
        "DELETE FROM messages WHERE topic = ?"
        " AND seq <= (SELECT min(cursor) FROM groups WHERE topic = ?)"
        " AND seq NOT IN (SELECT seq FROM leases WHERE topic = ?)",
        (topic, topic, topic),
    )


def row_message(topic: str, row: Any) -> Message:
    """The message of one row of :data:`COLUMNS` (``seq`` first, not part of the message)."""
    _, id_, key, type_, headers, payload = row
    if type(payload) is not bytes:  # a plain client may have stored TEXT
        payload = payload.encode() if isinstance(payload, str) else bytes(payload)
    return Message(
        id=id_,
        topic=topic,
        payload=payload,
        key=key,
        type=type_,
        headers=_headers(headers) if headers else {},
    )


def _headers(text: str) -> dict[str, str]:
    try:
        return _decode_headers(text)
    except msgspec.DecodeError:
        # Written by a plain client: deliver it anyway rather than wedge the group on it.
        return {"invalid_headers": str(text)}
