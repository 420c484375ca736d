"""The repository: load aggregates from the event store, save their new events.

::

    accounts = Repository(Account, store, app=app)    # app: publish what is stored
    acc = await accounts.get("acc-1")                 # latest snapshot + later events
    acc.deposit(50)
    await accounts.save(acc)                          # append at the version it was loaded at

    await accounts.update("acc-1", lambda a: a.deposit(50))   # load, run, save; retried on
                                                              # ConcurrencyError (bounded)
    old = await accounts.get("acc-1", at=yesterday)   # time travel: as of a time or version

``save`` appends with ``expected_version`` = the version the aggregate was loaded at, so of two
writers of one aggregate exactly one wins; the other gets
:class:`~herald.eventsourcing.ConcurrencyError` and can reload and retry. With ``app=``, the
saved events are then published by the store's :class:`~herald.eventsourcing.Relay` to the
aggregate's topic, keyed by the aggregate id.
"""

from __future__ import annotations

import inspect
import logging
import re
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any, Generic, TypeVar

from herald.app import App
from herald.context import Context
from herald.eventsourcing.aggregate import Aggregate
from herald.eventsourcing.causation import causal_headers, current_context
from herald.eventsourcing.errors import AggregateNotFound, ConcurrencyError
from herald.eventsourcing.recorded import Recorded
from herald.eventsourcing.relay import Relay
from herald.eventsourcing.snapshot import restore, take
from herald.eventsourcing.store import EventStore
from herald.transports import validate_name

__all__ = ["Repository"]

log = logging.getLogger("herald.eventsourcing")
A = TypeVar("A", bound=Aggregate)


class Repository(Generic[A]):
    """Loads and saves aggregates of one class.

    :param aggregate: the :class:`Aggregate` subclass.
    :param store: the :class:`EventStore`; the aggregate's event classes are registered in its
        registry.
    :param app: publish saved events on this app's broker (through the store's relay).
    :param topic: the topic they go to (default: ``aggregate.topic``, else the class name in
        lower case).
    """

    def __init__(
        self,
        aggregate: type[A],
        store: EventStore,
        *,
        app: App | None = None,
        topic: str | None = None,
    ) -> None:
        if not (isinstance(aggregate, type) and issubclass(aggregate, Aggregate)):
            raise TypeError(f"Repository needs an Aggregate subclass, got {aggregate!r}")
        self.aggregate = aggregate
        self.store = store
        store.registry.register(*aggregate.event_classes())
        self.topic = validate_name("topic", topic or aggregate.topic or _default_topic(aggregate))
        self.app = app
        self.relay = Relay.for_app(app, store) if app is not None else None

    def new(self, id: str) -> A:
        """A new aggregate at version 0 (saving it fails if ``id`` already has events)."""
        return self.aggregate(id)

    async def get(
        self, id: str, *, version: int | None = None, at: datetime | float | None = None
    ) -> A:
        """The aggregate rebuilt from its events: the latest one, or as of ``version`` or as of
        the time ``at`` (a timezone-aware datetime or Unix seconds).

        Raises :class:`AggregateNotFound` if it had no events by then, and
        :class:`~herald.eventsourcing.UnknownEvent` for a stored event that cannot be decoded.
        """
        if at is not None:
            if version is not None:
                raise ValueError("give version= or at=, not both")
            ts = _timestamp(at)
            version = await self.store.version_at(id, ts)
            if version == 0:
                raise AggregateNotFound(id, f" as of {at}")
        elif version is not None and (not isinstance(version, int) or version < 1):
            raise ValueError(f"version must be an int >= 1, got {version!r}")
        cls = self.aggregate
        agg: A | None = None
        # snapshots may exist without snapshot_every (taken on demand): always look
        snap = await self.store.backend.latest_snapshot(id, cls.kind(), version)
        if snap is not None:
            agg = restore(cls, snap)
        if agg is None:
            agg = cls(id)
        recs = await self.store.read(id, agg.version, version)
        decode = self.store.decode
        for rec in recs:
            agg.apply(decode(rec))
        if agg.version == 0:
            raise AggregateNotFound(id)
        if version is not None and agg.version < version:
            raise AggregateNotFound(id, f" at version {version} (it is at {agg.version})")
        return agg

    async def save(
        self,
        aggregate: A,
        *,
        ctx: Context | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> list[Recorded]:
        """Append the aggregate's new events at the version it was loaded at; return them.

        Raises :class:`ConcurrencyError` if another writer saved first (nothing is written;
        the aggregate keeps its pending events). ``ctx`` (default: the command being handled,
        see :mod:`herald.eventsourcing.causation`) gives the events their correlation and
        causation. Snapshots are taken in the same transaction when the save crosses a
        multiple of ``snapshot_every``. With an app, returns once the events are published
        (a failed publish is logged; the relay publishes them on its next pump).
        """
        if not isinstance(aggregate, self.aggregate):
            raise TypeError(f"this repository saves {self.aggregate.__qualname__} aggregates")
        pending = aggregate._pending
        if not pending:
            return []
        h = causal_headers(ctx if ctx is not None else current_context())
        if headers:
            h.update(headers)
        expected = aggregate.version - len(pending)
        every = self.aggregate.snapshot_every
        snap = None
        if every is not None and expected // every != aggregate.version // every:
            snap = take(aggregate, self.store.clock())
        events = self.store.encode(pending, h)
        recs = await self.store.append_encoded(
            aggregate.id, events, expected, topic=self.topic, snapshot=snap
        )
        aggregate._saved()
        await self._publish(recs[-1].position)
        return recs

    async def _publish(self, upto: int) -> None:
        relay = self.relay
        if relay is None or not relay.running:
            return
        try:
            await relay.pump(upto)
        except Exception as e:  # stored is what counts; the next pump publishes it
            log.warning("events stored but not yet published (the relay will retry): %s", e)

    async def snapshot(self, aggregate: A) -> None:
        """Store a snapshot of ``aggregate`` now (it must have no unsaved events)."""
        if aggregate._pending:
            raise ValueError("save the aggregate before taking a snapshot of it")
        if aggregate.version == 0:
            raise ValueError("an aggregate with no events has nothing to snapshot")
        await self.store.backend.save_snapshot(take(aggregate, self.store.clock()))

    async def update(
        self,
        id: str,
        command: Callable[[A], Any],
        *,
        create: bool = False,
        attempts: int = 5,
        ctx: Context | None = None,
    ) -> A:
        """Load ``id`` (a new aggregate if it has no events and ``create``), run ``command``
        on it (a function, sync or async), save. On :class:`ConcurrencyError` reload and run
        it again, ``attempts`` times in all; the last conflict is raised."""
        if attempts < 1:
            raise ValueError("attempts must be at least 1")
        for attempt in range(1, attempts + 1):
            try:
                agg = await self.get(id)
            except AggregateNotFound:
                if not create:
                    raise
                agg = self.new(id)
            out = command(agg)
            if inspect.isawaitable(out):
                await out
            try:
                await self.save(agg, ctx=ctx)
                return agg
            except ConcurrencyError as e:
                if attempt == attempts:
                    raise
                log.debug("retrying a command on %s (attempt %d): %s", id, attempt, e)
        raise AssertionError("unreachable")


def _default_topic(cls: type) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", cls.__name__).lower()


def _timestamp(at: datetime | float) -> float:
    if isinstance(at, datetime):
        if at.tzinfo is None:
            raise ValueError("at= needs a timezone-aware datetime (e.g. datetime.now(UTC))")
        return at.timestamp()
    if isinstance(at, int | float) and not isinstance(at, bool):
        return float(at)
    raise TypeError(f"at= takes a datetime or Unix seconds, got {at!r}")
