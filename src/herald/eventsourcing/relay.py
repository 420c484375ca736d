"""The relay: every stored event reaches the App's broker, without a dual write.

The event store is its own outbox. An append commits the events (with the topic they go to);
the relay then reads everything after its cursor in commit order, publishes it, and moves the
cursor. A process that dies between the commit and the publish loses nothing: the next pump
(on the next save in any process, or when an app with the relay starts) publishes from the
cursor. So each stored event is published **at least once**, and always in commit order, so
in version order per aggregate (the message key is the stream id).

The message id is the stored event's id, the same on every re-publish, so a consumer with the
inbox (``dedupe=True``) handles each event **once**. Headers: what was stored with the event
(``correlation_id``, ``causation_id``), plus ``stream_id``, ``stream_version``,
``stream_position``, ``schema_version``, ``occurred_at`` (the commit time), ``source`` and
``content_type``.

Only one pump runs at a time per store (a lease row in the store, renewed per batch, expiring
after ``lease_ttl`` seconds if its holder dies), so two processes never interleave and reorder
an aggregate's events. A pump that finds the lease taken waits for it.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Sequence
from datetime import UTC, datetime

import anyio

from herald.app import App
from herald.eventsourcing.recorded import Recorded
from herald.eventsourcing.store import EventStore
from herald.message import (
    CONTENT_TYPE,
    CORRELATION_ID,
    OCCURRED_AT,
    SCHEMA_VERSION,
    SOURCE,
    Message,
    new_id,
)

__all__ = ["STREAM_ID", "STREAM_POSITION", "STREAM_VERSION", "Relay"]

log = logging.getLogger("herald.eventsourcing")

STREAM_ID = "stream_id"
STREAM_VERSION = "stream_version"
STREAM_POSITION = "stream_position"

_relays: weakref.WeakKeyDictionary[App, dict[int, Relay]] = weakref.WeakKeyDictionary()


def rfc3339(ts: float) -> str:
    dt = datetime.fromtimestamp(ts, tz=UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{int(ts * 1000) % 1000:03d}Z"


def to_message(rec: Recorded, topic: str, source: str) -> Message:
    """The bus message of a stored event (same id on every publish)."""
    h = dict(rec.headers)
    h.setdefault(CORRELATION_ID, rec.id)
    h[OCCURRED_AT] = rfc3339(rec.recorded_at)
    h[SOURCE] = source
    h[CONTENT_TYPE] = rec.content_type
    h[SCHEMA_VERSION] = str(rec.schema_version)
    h[STREAM_ID] = rec.stream
    h[STREAM_VERSION] = str(rec.version)
    h[STREAM_POSITION] = str(rec.position)
    return Message(id=rec.id, topic=topic, payload=rec.payload, key=rec.stream, type=rec.type,
                   headers=h)  # fmt: skip


class Relay:
    """Publishes what ``store`` holds to ``app``'s broker. One per (app, store): use
    :meth:`for_app`. The app opens the store and pumps once when it starts."""

    def __init__(
        self,
        app: App,
        store: EventStore,
        *,
        name: str = "relay",
        batch: int = 500,
        lease_ttl: float = 10.0,
    ) -> None:
        self.app = app
        self.store = store
        self.name = name
        self.batch = batch
        self.lease_ttl = lease_ttl
        self.owner = new_id()
        self._lock = anyio.Lock()
        self._done_upto = 0  # every event at or below this position is published
        #: events published by this relay since start (re-publishes included)
        self.published = 0
        #: whether the app is running (saves pump only then; the app's start pumps the rest)
        self.running = False
        app.on_startup(self._start)
        app.on_shutdown(self._stop)

    @classmethod
    def for_app(cls, app: App, store: EventStore) -> Relay:
        """The relay of ``store`` on ``app`` (created, and hooked to the app, on first use)."""
        by_store = _relays.setdefault(app, {})
        relay = by_store.get(id(store))
        if relay is None or relay.store is not store:
            relay = by_store[id(store)] = cls(app, store)
        return relay

    async def _start(self) -> None:
        await self.store.open()
        try:
            await self.pump()  # what a crashed process stored but did not publish
        except BaseException:
            await self.store.close()
            raise
        self.running = True

    async def _stop(self) -> None:
        self.running = False
        await self.store.close()

    async def position(self) -> int:
        """The position of the last event published (0 if none)."""
        return await self.store.backend.relay_position(self.name)

    async def pump(self, upto: int | None = None) -> int:
        """Publish everything stored after the relay's cursor; return how many events.

        Returns once the events committed before the call are on the broker (durably, as the
        transport's ``publish`` promises). Raises the transport's error if publishing fails;
        the cursor then stays, and the next pump publishes them again. ``upto``: the caller
        only needs events up to this position published; if this relay has already done so
        (a concurrent save's pump took them along), it returns at once.
        """
        backend = self.store.backend
        async with self._lock:
            if upto is not None and upto <= self._done_upto:
                return 0
            deadline = time.monotonic() + self.lease_ttl + 1.0
            while True:
                pos = await backend.claim_relay(self.name, self.owner, self.lease_ttl, time.time())
                if pos is not None:
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"relay lease {self.name!r} of {self.store!r} held by another process "
                        f"for over {self.lease_ttl:.0f}s"
                    )
                await anyio.sleep(0.01)
            sent = 0
            try:
                while True:
                    recs = await self.store.read_all(after=pos, limit=self.batch)
                    if not recs:
                        break
                    await self._publish(recs)
                    sent += len(recs)
                    pos = recs[-1].position
                    if len(recs) < self.batch:
                        break
                    # renew the lease between batches (and record progress)
                    await backend.advance_relay(self.name, self.owner, pos, release=False)
                    await backend.claim_relay(self.name, self.owner, self.lease_ttl, time.time())
            finally:
                with anyio.CancelScope(shield=True):
                    await backend.advance_relay(self.name, self.owner, pos, release=True)
            self._done_upto = max(self._done_upto, pos)
            self.published += sent
            return sent

    async def _publish(self, recs: Sequence[Recorded]) -> None:
        # one publish per run of consecutive events to the same topic: order is kept
        transport, source = self.app.transport, self.app.name
        run: list[Message] = []
        for rec in recs:
            topic = rec.topic
            if topic is None:
                continue
            if run and run[0].topic != topic:
                await transport.publish(run[0].topic, run)
                run = []
            run.append(to_message(rec, topic, source))
        if run:
            await transport.publish(run[0].topic, run)
