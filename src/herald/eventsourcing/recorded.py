"""What the event store holds: one :class:`Recorded` event, and one :class:`NewEvent` to append."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["NewEvent", "Recorded", "Snapshot"]


@dataclass(slots=True, frozen=True)
class NewEvent:
    """An encoded event about to be appended (the store assigns version and position)."""

    id: str
    type: str
    schema_version: int
    content_type: str
    payload: bytes
    headers: dict[str, str]


@dataclass(slots=True, frozen=True)
class Recorded:
    """One stored event.

    ``position`` is its place in the store's commit order (gap-free to readers: no event ever
    appears below a position a reader has passed); ``version`` its place in its stream (1, 2,
    ...). ``id`` is also the message id it is published under, so a consumer's inbox recognises
    a re-publish. ``topic`` is where the relay publishes it (``None``: not published).
    """

    position: int
    stream: str
    version: int
    id: str
    type: str
    schema_version: int
    content_type: str
    payload: bytes
    headers: dict[str, str]
    recorded_at: float
    topic: str | None


@dataclass(slots=True, frozen=True)
class Snapshot:
    """An aggregate's encoded state at ``version``; ``shape`` fingerprints its class."""

    stream: str
    version: int
    kind: str
    shape: str
    state: bytes
    recorded_at: float
