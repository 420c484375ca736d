"""Event sourcing and CQRS on the App API: aggregates, an async event store, snapshots,
upcasting, time travel, projections with exactly-once positions, and commands with replies.

Built only on Herald's public modules (App, Context, Message, codec, transports' contract);
the core never imports this package.
"""

from herald.eventsourcing.aggregate import Aggregate
from herald.eventsourcing.commands import Commands
from herald.eventsourcing.errors import (
    AggregateNotFound,
    ConcurrencyError,
    ProjectionFailed,
    Rejected,
    UnknownEvent,
)
from herald.eventsourcing.projection import (
    Projection,
    ProjectionStatus,
    projection,
    projections_of,
)
from herald.eventsourcing.readmodel import ReadModel, Tx
from herald.eventsourcing.recorded import Recorded, Snapshot
from herald.eventsourcing.registry import EventRegistry, schema_version
from herald.eventsourcing.relay import Relay
from herald.eventsourcing.repository import Repository
from herald.eventsourcing.store import EventStore
from herald.eventsourcing.upcasting import upcasting

__all__ = [
    "Aggregate",
    "AggregateNotFound",
    "Commands",
    "ConcurrencyError",
    "EventRegistry",
    "EventStore",
    "Projection",
    "ProjectionFailed",
    "ProjectionStatus",
    "ReadModel",
    "Recorded",
    "Rejected",
    "Relay",
    "Repository",
    "Snapshot",
    "Tx",
    "UnknownEvent",
    "projection",
    "projections_of",
    "schema_version",
    "upcasting",
]
