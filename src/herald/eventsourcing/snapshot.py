"""Snapshots: an aggregate's state at a version, so loading need not replay every event.

A snapshot stores the aggregate's annotated state attributes as JSON with a *shape*: a
fingerprint of the class's state fields and their types. Loading uses the newest snapshot
whose shape matches the current class and replays only the later events; a snapshot of an
older shape (a field added, removed or retyped) or one that no longer decodes is ignored —
the aggregate is rebuilt from its events, as if there were no snapshot. Never fatal.
"""

from __future__ import annotations

import hashlib
import logging
from typing import TypeVar

import msgspec

from herald.eventsourcing.aggregate import Aggregate
from herald.eventsourcing.recorded import Snapshot

__all__ = ["restore", "shape_of", "take"]

log = logging.getLogger("herald.eventsourcing")
A = TypeVar("A", bound=Aggregate)
_encode = msgspec.json.Encoder().encode
_shapes: dict[type, tuple[str, type[msgspec.Struct]]] = {}


def _shape(cls: type[Aggregate]) -> tuple[str, type[msgspec.Struct]]:
    known = _shapes.get(cls)
    if known is None:
        fields = sorted(cls.state_fields().items())
        text = ";".join(f"{n}:{t!r}" for n, t in fields)
        digest = hashlib.sha256(f"{cls.kind()}|{text}".encode()).hexdigest()[:16]
        struct = msgspec.defstruct(f"{cls.__name__}State", [(n, t) for n, t in fields])
        known = _shapes[cls] = (digest, struct)
    return known


def shape_of(cls: type[Aggregate]) -> str:
    """The fingerprint of ``cls``'s state fields and types."""
    return _shape(cls)[0]


def take(aggregate: Aggregate, now: float = 0.0) -> Snapshot:
    """A snapshot of ``aggregate`` at its current version. ``TypeError`` if a state attribute
    is not JSON-encodable by msgspec."""
    cls = type(aggregate)
    state = {n: getattr(aggregate, n) for n in cls.state_fields()}
    try:
        payload = _encode(state)
    except (TypeError, msgspec.EncodeError) as e:
        raise TypeError(f"cannot snapshot {cls.__qualname__}: {e}") from e
    return Snapshot(aggregate.id, aggregate.version, cls.kind(), shape_of(cls), payload, now)


def restore(cls: type[A], snapshot: Snapshot) -> A | None:
    """The aggregate a snapshot describes, or ``None`` when the snapshot is of another shape or
    does not decode (logged; the caller replays the events instead)."""
    shape, struct = _shape(cls)
    if snapshot.shape != shape:
        log.info(
            "ignoring snapshot of %s %r at version %d: taken with another class shape",
            cls.__qualname__,
            snapshot.stream,
            snapshot.version,
        )
        return None
    try:
        state = msgspec.json.decode(snapshot.state, type=struct)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        log.warning(
            "ignoring snapshot of %s %r at version %d: %s",
            cls.__qualname__,
            snapshot.stream,
            snapshot.version,
            e,
        )
        return None
    agg = cls(snapshot.stream)
    for name in cls.state_fields():
        setattr(agg, name, getattr(state, name))
    agg.version = snapshot.version
    return agg
