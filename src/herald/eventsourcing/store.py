"""The event store: streams of typed events, appended with optimistic concurrency.

::

    store = EventStore("sqlite:///bank.db")        # or "postgresql://user@host/db"
    async with store:
        await store.append("acc-1", [AccountOpened(owner="ada")], expected_version=0)
        for rec in await store.read("acc-1"):
            print(rec.version, store.decode(rec))

* ``append(stream, events, expected_version)`` stores the events as versions
  ``expected_version + 1 ...`` or raises :class:`~herald.eventsourcing.ConcurrencyError` naming
  the stream, the expected and the actual version; nothing is written then. Concurrent appends
  in one process share one transaction and one durable commit (group commit), each with its own
  version check.
* ``read(stream, after_version, to_version)`` reads one stream; ``read_all(after, limit)``
  reads every stream in commit order, gap-free (see :mod:`herald.eventsourcing.backend`).
* Events are the classes Herald already encodes (Pydantic models, msgspec Structs,
  dataclasses), stored as JSON with their type name and schema version; :meth:`decode` turns a
  record back into the current class through the store's :class:`EventRegistry` (upcasters
  included).

SQLite (the default; the file may be the SQLite broker's own) and PostgreSQL. Several
processes may share one store.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import anyio

from herald.codec import encode_many
from herald.eventsourcing.backend import AppendRequest, StoreBackend
from herald.eventsourcing.errors import ConcurrencyError
from herald.eventsourcing.recorded import NewEvent, Recorded, Snapshot
from herald.eventsourcing.registry import EventRegistry, schema_version
from herald.message import new_ids
from herald.transports import TransportError, redact_url

__all__ = ["EventStore"]

_PREFIX = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,40}")


class EventStore:
    """Streams of events in SQLite or PostgreSQL.

    :param url: ``sqlite:///path.db`` (relative) or ``sqlite:////abs/path.db``, or a
        ``postgresql://`` URL.
    :param prefix: table name prefix (several stores may share one database).
    :param registry: the event classes and upcasters to decode with (default: a new one;
        repositories register their aggregates' event classes in it).
    :param clock: the time recorded with each append (Unix seconds); tests and examples
        replace it to record "yesterday".
    """

    def __init__(
        self,
        url: str = "sqlite:///events.db",
        *,
        prefix: str = "herald_es",
        registry: EventRegistry | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not _PREFIX.fullmatch(prefix):
            raise ValueError(f"invalid table prefix {prefix!r}: letters, digits and _ only")
        self.url = url
        self.prefix = prefix
        self.registry = registry if registry is not None else EventRegistry()
        self.clock = clock
        self._backend = _backend_for(url, prefix)
        self._queue: list[tuple[AppendRequest, anyio.Event]] = []
        self._committing = False
        self._users = 0
        self._lifecycle = anyio.Lock()
        #: called with the records of every append this process commits (the relay listens)
        self.on_append: list[Callable[[list[Recorded]], None]] = []

    def __repr__(self) -> str:
        return f"EventStore({redact_url(self.url)!r}, prefix={self.prefix!r})"

    @property
    def backend(self) -> StoreBackend:
        return self._backend

    # --- lifecycle -------------------------------------------------------------------------

    async def open(self) -> None:
        """Connect (the first of several users) and create the tables if missing. Raises
        :class:`~herald.TransportError` when the database cannot be reached."""
        async with self._lifecycle:
            if self._users == 0:
                await self._backend.open()
            self._users += 1

    async def close(self) -> None:
        """Release one user's hold; the last one closes the connections."""
        async with self._lifecycle:
            if self._users == 0:
                return
            self._users -= 1
            if self._users == 0:
                with anyio.CancelScope(shield=True):
                    await self._backend.close()

    async def __aenter__(self) -> EventStore:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- writing ---------------------------------------------------------------------------

    def encode(self, events: Sequence[Any], headers: Mapping[str, str] | None) -> list[NewEvent]:
        """Encode event objects for :meth:`append_encoded`. ``TypeError`` for an object that
        is not an event class (Pydantic model, msgspec Struct, dataclass)."""
        if isinstance(events, str | bytes) or not isinstance(events, Sequence):
            raise TypeError(f"append() takes a list of events, got {type(events).__name__}")
        encoded = encode_many(events, "json")
        ids = new_ids(len(encoded))
        h = dict(headers or {})
        out = []
        for mid, event, (payload, type_name, content_type) in zip(
            ids, events, encoded, strict=True
        ):
            if type_name is None:
                raise TypeError(
                    f"cannot store a {type(event).__name__} as an event: use a Pydantic model, "
                    "msgspec Struct or dataclass (its class name is the event type)"
                )
            out.append(
                NewEvent(mid, type_name, schema_version(type(event)), content_type, payload, h)
            )
        return out

    async def append(
        self,
        stream: str,
        events: Sequence[Any],
        expected_version: int | None,
        *,
        topic: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> list[Recorded]:
        """Append ``events`` to ``stream`` if it is at ``expected_version`` (0: new stream;
        ``None``: whatever it is at). Returns the records once durably committed.

        ``topic``: where the relay publishes them (``None``: not published); ``headers`` are
        stored with each event and travel with it on the bus.
        """
        return await self.append_encoded(
            stream, self.encode(events, headers), expected_version, topic=topic
        )

    async def append_encoded(
        self,
        stream: str,
        events: Sequence[NewEvent],
        expected_version: int | None,
        *,
        topic: str | None = None,
        snapshot: Snapshot | None = None,
    ) -> list[Recorded]:
        """:meth:`append` for events already encoded; ``snapshot`` (its version is set to the
        new stream version) commits in the same transaction."""
        if not isinstance(stream, str) or not stream:
            raise ValueError("a stream id must be a non-empty string")
        if expected_version is not None and (
            not isinstance(expected_version, int) or expected_version < 0
        ):
            raise ValueError(f"expected_version must be an int >= 0, got {expected_version!r}")
        req = AppendRequest(stream, events, expected_version, topic, snapshot)
        await self._submit(req)
        if req.error is not None:
            if isinstance(req.error, ConcurrencyError):
                raise ConcurrencyError(req.stream, req.error.expected, req.error.actual)
            raise TransportError(f"append to stream {stream!r} failed: {req.error}") from (
                req.error
            )
        if req.result:
            for listener in self.on_append:
                listener(req.result)
        return req.result

    async def _submit(self, req: AppendRequest) -> None:
        # group commit: the first writer in commits everything queued meanwhile, in batches,
        # until the queue is empty; the others wait for their batch
        done = anyio.Event()
        self._queue.append((req, done))
        if self._committing:
            await done.wait()
            return
        self._committing = True
        try:
            # shielded: waiters whose requests are queued depend on this loop finishing
            with anyio.CancelScope(shield=True):
                while self._queue:
                    batch, self._queue = self._queue, []
                    try:
                        await self._backend.append([r for r, _ in batch], self.clock())
                    except Exception as e:
                        for r, _ in batch:
                            r.error, r.result = e, []
                    for _, ev in batch:
                        ev.set()
        finally:
            self._committing = False

    # --- reading ---------------------------------------------------------------------------

    async def read(
        self, stream: str, after_version: int = 0, to_version: int | None = None
    ) -> list[Recorded]:
        """The events of ``stream`` with ``after_version < version <= to_version``."""
        return await self._backend.read_stream(stream, after_version, to_version)

    async def read_all(
        self, after: int = 0, limit: int = 1000, topics: Sequence[str] | None = None
    ) -> list[Recorded]:
        """Up to ``limit`` events of every stream after position ``after``, in commit order
        (only those published to ``topics`` when given)."""
        if limit < 1:
            raise ValueError("limit must be at least 1")
        return await self._backend.read_all(after, limit, topics)

    async def head(self, topics: Sequence[str] | None = None) -> int:
        """The position of the last event (of ``topics``); 0 for an empty store."""
        return await self._backend.head(topics)

    async def version_at(self, stream: str, timestamp: float) -> int:
        """The version ``stream`` had at ``timestamp`` (Unix seconds): 0 if it did not exist."""
        return await self._backend.version_at(stream, timestamp)

    def decode(self, record: Recorded) -> Any:
        """The event object of a record, upcast to the current class. Raises
        :class:`~herald.eventsourcing.UnknownEvent` naming type and version if it cannot."""
        return self.registry.decode(
            record.type, record.schema_version, record.payload, record.content_type
        )


def _backend_for(url: str, prefix: str) -> StoreBackend:
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ValueError(f"event store URL needs a scheme (sqlite:/// or postgresql://): {url!r}")
    scheme = scheme.lower()
    if scheme == "sqlite":
        path = rest[1:] if rest.startswith("/") else rest
        if not path or path == ":memory:":
            raise ValueError(
                f"sqlite event store needs a file path (sqlite:///events.db), got {url!r}"
            )
        from herald.eventsourcing.sqlite_store import SqliteBackend

        return SqliteBackend(path.split("?", 1)[0], prefix)
    if scheme in ("postgresql", "postgres"):
        from herald.eventsourcing.postgres_store import PostgresBackend

        return PostgresBackend(url, prefix)
    raise ValueError(f"unsupported event store URL {redact_url(url)!r}: use sqlite or postgresql")
