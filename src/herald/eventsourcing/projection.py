"""Projections: read models kept up to date from the stored events, exactly once.

::

    @projection(app, store, db="sqlite:///read.db", topics=["account"])
    class Balances:
        tables = ("balances",)                       # dropped and recreated by a rebuild

        async def setup(self, tx: Tx) -> None:
            await tx.execute("CREATE TABLE IF NOT EXISTS balances (id TEXT PRIMARY KEY, "
                             "balance INTEGER NOT NULL)")

        async def on_deposited(self, e: MoneyDeposited, tx: Tx) -> None:
            await tx.execute("UPDATE balances SET balance = balance + ? WHERE id = ?",
                             (e.amount, tx.recorded.stream))

How it runs
    The projection is an App subscriber (group ``projection.<name>``) on the topics the relay
    publishes the stored events to. A message tells it the store has news; the projection
    then reads the store after its committed position, in commit order, and applies the
    events in batches: each batch's read-model writes and the new position commit in **one
    transaction** of the read-model database. So the effect is exactly-once on that database
    whatever the bus does — duplicates, redeliveries, reordering, a crash between any two
    steps: a message whose event is at or below the position changes nothing, and nothing
    is skipped because the store, not the message, says what comes next.

A handler that raises
    The events before it commit with the position just before it; the failing event's
    transaction rolls back and :class:`~herald.eventsourcing.ProjectionFailed` takes the usual
    path (retries, delayed redelivery, dead letters). The position never moves past that
    event: later messages stop at the same place until the handler is fixed.

Rebuild
    :meth:`Projection.rebuild` (``herald projections rebuild NAME``) drops ``tables``, runs
    ``setup``, replays every stored event from the start and sets the position, all in one
    transaction: readers see the old read model until it commits and the fresh one after
    (SQLite readers keep reading meanwhile; on PostgreSQL the dropped tables are locked for the
    rebuild). :meth:`Projection.status` gives the position and the lag (events not yet
    applied).

Handlers are ``async`` methods named ``on_...`` taking ``(event, tx)``, the event annotated with
its class (or a union); ``tx.recorded`` is the stored event (stream, version, time...). Events
of other types advance the position without a call.
"""

from __future__ import annotations

import inspect
import logging
import re
import time
import types
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, Union, get_args, get_origin, get_type_hints

import anyio

from herald.app import App
from herald.eventsourcing.errors import ProjectionFailed
from herald.eventsourcing.readmodel import ReadModel, Tx
from herald.eventsourcing.recorded import Recorded
from herald.eventsourcing.relay import STREAM_POSITION
from herald.eventsourcing.store import EventStore
from herald.message import Message
from herald.transports import validate_name

__all__ = ["Projection", "ProjectionStatus", "projection", "projections_of"]

log = logging.getLogger("herald.eventsourcing")
C = TypeVar("C", bound=type)
_by_app: weakref.WeakKeyDictionary[App, dict[str, Projection]] = weakref.WeakKeyDictionary()
_SET_POSITION = (
    "INSERT INTO herald_projections (name, position, updated_at) VALUES (?, ?, ?)"
    " ON CONFLICT (name) DO UPDATE SET position = excluded.position,"
    " updated_at = excluded.updated_at"
)


@dataclass(frozen=True, slots=True)
class ProjectionStatus:
    name: str
    position: int
    head: int
    #: stored events of its topics not yet applied
    lag: int


def projections_of(app: App) -> dict[str, Projection]:
    """The projections registered on ``app``, by name."""
    return dict(_by_app.get(app, {}))


def projection(
    app: App | None,
    store: EventStore,
    *,
    db: ReadModel | str,
    topics: Sequence[str],
    name: str | None = None,
    batch: int = 1000,
) -> Callable[[type], Projection]:
    """Class decorator: instantiate the class (no arguments) and return its
    :class:`Projection`, registered on ``app`` (``None``: drive it with :meth:`catch_up`)."""

    def make(cls: type) -> Projection:
        return Projection(
            cls(), store=store, db=db, topics=topics, app=app, batch=batch,
            name=name or _snake(cls.__name__),
        )  # fmt: skip

    return make


class Projection:
    """One read model fed by the stored events of ``topics``; see the module docstring."""

    def __init__(
        self,
        handlers: object,
        *,
        name: str,
        store: EventStore,
        db: ReadModel | str,
        topics: Sequence[str],
        app: App | None = None,
        batch: int = 1000,
    ) -> None:
        validate_name("projection", name)
        if isinstance(topics, str) or not topics:
            raise ValueError("topics= takes a non-empty list of topic names")
        if batch < 1:
            raise ValueError("batch must be at least 1")
        self.name = name
        self.handlers = handlers
        self.store = store
        self.db = ReadModel(db) if isinstance(db, str) else db
        self.topics = [validate_name("topic", t) for t in topics]
        self.batch = batch
        self.app = app
        self._calls = self._collect(handlers)
        #: the last committed position this process knows of (a lower bound of the truth)
        self.position = 0
        self._lock = anyio.Lock()
        if app is not None:
            known = _by_app.setdefault(app, {})
            if name in known:
                raise ValueError(f"app {app.name!r} already has a projection {name!r}")
            known[name] = self
            for t in self.topics:
                app.subscriber(t, group=f"projection.{name}")(self._on_message)
            app.on_startup(self.open)
            app.on_shutdown(self.close)

    def __repr__(self) -> str:
        return f"Projection({self.name!r}, topics={self.topics!r}, db={self.db!r})"

    def _collect(self, handlers: object) -> dict[str, Callable[[Any, Tx], Any]]:
        calls: dict[str, Callable[[Any, Tx], Any]] = {}
        for attr, fn in inspect.getmembers(handlers, inspect.ismethod):
            if not attr.startswith("on_"):
                continue
            if not inspect.iscoroutinefunction(fn):
                raise TypeError(f"projection {self.name}: {attr} must be async")
            params = list(inspect.signature(fn).parameters.values())
            ann = get_type_hints(fn).get(params[0].name) if params else None
            if ann is None or len(params) != 2:
                raise TypeError(f"projection {self.name}: {attr} must take (event: Class, tx)")
            members = get_args(ann) if get_origin(ann) in (Union, types.UnionType) else (ann,)
            self.store.registry.register(*members)
            for cls in members:
                for type_name in self.store.registry.sources_of(cls):
                    if type_name in calls:
                        raise TypeError(f"projection {self.name}: two handlers for {type_name}")
                    calls[type_name] = fn
        return calls

    # --- lifecycle -------------------------------------------------------------------------

    async def open(self) -> None:
        """Open the store and the read model and run ``setup`` (the app does this at start)."""
        await self.store.open()
        try:
            await self.db.open()
            async with self.db.transaction() as tx:
                await self._setup(tx)
            self.position = await self.db.position(self.name)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self.store.close()
            raise

    async def close(self) -> None:
        await self.db.close()
        await self.store.close()

    async def __aenter__(self) -> Projection:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _setup(self, tx: Tx) -> None:
        setup = getattr(self.handlers, "setup", None)
        if setup is not None:
            await setup(tx)

    # --- applying --------------------------------------------------------------------------

    async def _on_message(self, message: Message) -> None:
        raw = message.headers.get(STREAM_POSITION)
        if raw is not None and raw.isdigit() and int(raw) <= self.position:
            return  # applied already (a duplicate, or caught up by an earlier message)
        await self.catch_up()

    async def catch_up(self) -> int:
        """Apply every stored event after the committed position; return how many.

        Raises :class:`ProjectionFailed` (after committing the events before it) if a handler
        raises."""
        applied = 0
        async with self._lock:
            while True:
                n, more = await self._batch()
                applied += n
                if not more:
                    return applied

    async def _batch(self) -> tuple[int, bool]:
        try:
            async with self.db.transaction() as tx:
                pos = await self._position(tx)
                recs = await self.store.read_all(after=pos, limit=self.batch, topics=self.topics)
                if not recs:
                    self.position = pos
                    return 0, False
                done, error = await self._apply(tx, recs)
                if error is not None:
                    raise _Failed(pos, recs, done, error)  # rolls the whole batch back
                await tx.execute(_SET_POSITION, (self.name, recs[-1].position, time.time()))
        except _Failed as f:
            await self._commit_before(f)
            rec = f.recs[f.done]
            raise ProjectionFailed(
                self.name, rec.stream, rec.version, rec.position, rec.type
            ) from f.error
        self.position = recs[-1].position
        return len(recs), len(recs) == self.batch

    async def _commit_before(self, f: _Failed) -> None:
        """Commit the events of a failed batch that came before the failing one."""
        if f.done == 0:
            return
        ok = f.recs[: f.done]
        async with self.db.transaction() as tx:
            if await self._position(tx) != f.position:
                return  # another worker moved it meanwhile: it will get there itself
            done, error = await self._apply(tx, ok)
            if error is not None:  # not deterministic: commit nothing
                raise _Failed(f.position, ok, done, error)
            await tx.execute(_SET_POSITION, (self.name, ok[-1].position, time.time()))
        self.position = ok[-1].position

    async def _apply(self, tx: Tx, recs: Sequence[Recorded]) -> tuple[int, Exception | None]:
        """Run the handlers; return how many events were applied and the error that stopped
        them (``None``: all of them)."""
        calls, decode = self._calls, self.store.decode
        for i, rec in enumerate(recs):
            fn = calls.get(rec.type)
            if fn is None:
                continue
            tx.recorded = rec
            try:
                await fn(decode(rec), tx)
            except Exception as e:
                return i, e
        return len(recs), None

    async def _position(self, tx: Tx) -> int:
        lock = "" if self.db.is_sqlite else " FOR UPDATE"  # SQLite: BEGIN IMMEDIATE serialises
        row = await tx.fetchone(
            f"SELECT position FROM herald_projections WHERE name = ?{lock}", (self.name,)
        )
        return int(row[0]) if row else 0

    async def status(self) -> ProjectionStatus:
        """Position, head of the store's events on the projection's topics, and lag."""
        pos = await self.db.position(self.name)
        head = await self.store.head(self.topics)
        lag = await self.store.backend.count_after(pos, self.topics)
        return ProjectionStatus(self.name, pos, head, lag)

    async def rebuild(self) -> int:
        """Replay every stored event into a fresh read model and switch over atomically."""
        applied = 0
        tables = tuple(getattr(self.handlers, "tables", ()))
        for t in tables:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", t):
                raise ValueError(f"projection {self.name}: bad table name {t!r}")
        async with self._lock, self.db.transaction() as tx:
            for t in tables:
                await tx.execute(f"DROP TABLE IF EXISTS {t}")
            await self._setup(tx)
            pos = 0
            while True:
                recs = await self.store.read_all(after=pos, limit=self.batch, topics=self.topics)
                if not recs:
                    break
                done, error = await self._apply(tx, recs)
                if error is not None:
                    rec = recs[done]
                    raise ProjectionFailed(
                        self.name, rec.stream, rec.version, rec.position, rec.type
                    ) from error
                applied += done
                pos = recs[-1].position
            await tx.execute(_SET_POSITION, (self.name, pos, time.time()))
        self.position = pos
        return applied


class _Failed(Exception):
    """A batch stopped by a handler error at ``recs[done]`` (the batch started at ``position``)."""

    def __init__(
        self, position: int, recs: Sequence[Recorded], done: int, error: Exception
    ) -> None:
        self.position = position
        self.recs = recs
        self.done = done
        self.error = error


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()
