"""The contract between :class:`~herald.eventsourcing.EventStore` and one database engine.

A backend stores three things: events (``append``/``read_*``), snapshots, and the relay's
cursor and lease. It has two obligations beyond plain storage:

* **Optimistic concurrency**: an append whose ``expected_version`` is not the stream's current
  version fails with :class:`~herald.eventsourcing.ConcurrencyError` and writes nothing; a
  unique ``(stream, version)`` key backs the check up, so no two events share a version.
* **Gap-free commit order**: :meth:`read_all` after position ``p`` never misses an event that
  commits later with a position ``<= p``. (A sequence alone does not give that on a database
  with concurrent writers: a transaction can take position 10, commit after 11, and a reader
  that saw 11 moves past 10 for good — the classic outbox bug.)

Appends arrive as batches of independent requests (group commit): one transaction, one
durable commit for all of them; each request succeeds or fails on its own version check.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field

from herald.eventsourcing.recorded import NewEvent, Recorded, Snapshot

__all__ = ["AppendRequest", "StoreBackend"]


@dataclass(slots=True)
class AppendRequest:
    """One writer's append; the backend fills ``result`` or ``error``."""

    stream: str
    events: Sequence[NewEvent]
    expected_version: int | None  # None: append at the end, whatever the version
    topic: str | None
    snapshot: Snapshot | None = None
    result: list[Recorded] = field(default_factory=list)
    error: Exception | None = None


class StoreBackend(ABC):
    """One database engine under the event store. Methods may be called concurrently."""

    @abstractmethod
    async def open(self) -> None:
        """Connect and create the tables if missing (safe from several processes at once)."""

    @abstractmethod
    async def close(self) -> None:
        """Close the connections; runs shielded."""

    @abstractmethod
    async def append(self, requests: Sequence[AppendRequest], now: float) -> None:
        """Commit ``requests`` in one transaction; each gets its ``result`` or a
        ``ConcurrencyError``. Raises only if the transaction itself fails (then none is stored).
        """

    @abstractmethod
    async def read_stream(
        self, stream: str, after_version: int = 0, to_version: int | None = None
    ) -> list[Recorded]:
        """The stream's events with ``after_version < version <= to_version``, in order."""

    @abstractmethod
    async def read_all(
        self, after_position: int, limit: int, topics: Sequence[str] | None = None
    ) -> list[Recorded]:
        """Up to ``limit`` events after ``after_position`` in commit order (of ``topics``)."""

    @abstractmethod
    async def head(self, topics: Sequence[str] | None = None) -> int:
        """The position of the last committed event (of ``topics``), 0 if none."""

    @abstractmethod
    async def count_after(self, position: int, topics: Sequence[str] | None = None) -> int:
        """How many events (of ``topics``) are after ``position``."""

    @abstractmethod
    async def version_at(self, stream: str, timestamp: float) -> int:
        """The stream's version as of ``timestamp`` (Unix seconds): 0 if it did not exist."""

    @abstractmethod
    async def save_snapshot(self, snapshot: Snapshot) -> None:
        """Store a snapshot (replacing one at the same version)."""

    @abstractmethod
    async def latest_snapshot(
        self, stream: str, kind: str, max_version: int | None = None
    ) -> Snapshot | None:
        """The newest snapshot of ``stream`` for ``kind`` at or below ``max_version``."""

    @abstractmethod
    async def claim_relay(self, name: str, owner: str, ttl: float, now: float) -> int | None:
        """Take (or renew) the relay lease ``name`` for ``owner`` until ``now + ttl``; return
        the relay's position, or ``None`` if another owner holds an unexpired lease."""

    @abstractmethod
    async def advance_relay(self, name: str, owner: str, position: int, release: bool) -> None:
        """Move the relay's position (if ``owner`` still holds the lease); ``release`` ends
        the lease."""

    @abstractmethod
    async def relay_position(self, name: str) -> int:
        """The relay's position (0 if it never ran)."""
