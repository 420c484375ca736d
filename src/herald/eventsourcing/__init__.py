"""Event sourcing and CQRS on the App API: aggregates, an async event store, snapshots,
upcasting, time travel, projections with exactly-once positions, and commands with replies.

Built only on Herald's public modules (App, Context, Message, codec, transports' contract);
the core never imports this package.
"""

from herald.eventsourcing.aggregate import Aggregate
from herald.eventsourcing.errors import (
    AggregateNotFound,
    ConcurrencyError,
    Rejected,
    UnknownEvent,
)
from herald.eventsourcing.recorded import Recorded, Snapshot
from herald.eventsourcing.registry import EventRegistry, schema_version
from herald.eventsourcing.relay import Relay
from herald.eventsourcing.repository import Repository
from herald.eventsourcing.store import EventStore

__all__ = [
    "Aggregate",
    "AggregateNotFound",
    "ConcurrencyError",
    "EventRegistry",
    "EventStore",
    "Recorded",
    "Rejected",
    "Relay",
    "Repository",
    "Snapshot",
    "UnknownEvent",
    "schema_version",
]
