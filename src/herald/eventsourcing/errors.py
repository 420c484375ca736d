"""The errors of event sourcing: each one names what went wrong and where."""

from __future__ import annotations

from herald.errors import DecodeError, Permanent

__all__ = [
    "AggregateNotFound",
    "ConcurrencyError",
    "ProjectionFailed",
    "Rejected",
    "UnknownEvent",
]


class ConcurrencyError(Exception):
    """An append found the stream at another version than the writer expected.

    Another writer appended first. Reload the aggregate and run the command again
    (:meth:`~herald.eventsourcing.Repository.update` does that a bounded number of times).
    """

    def __init__(self, stream: str, expected: int, actual: int) -> None:
        self.stream = stream
        self.expected = expected
        self.actual = actual
        super().__init__(
            f"stream {stream!r} is at version {actual}, not the expected {expected}: another "
            "writer appended first; reload and retry"
        )


class AggregateNotFound(LookupError):
    """No events are stored for this aggregate id (or none as of the version/time asked for)."""

    def __init__(self, stream: str, detail: str = "") -> None:
        self.stream = stream
        super().__init__(f"no aggregate {stream!r}{detail}")


class UnknownEvent(DecodeError):
    """A stored (or received) event whose type and version no registered class or upcaster
    turns into an event: the class was removed or renamed without an upcaster. Never skipped.
    """

    def __init__(self, type_name: str, version: int, detail: str) -> None:
        self.type_name = type_name
        self.version = version
        super().__init__(f"cannot decode event {type_name!r} schema version {version}: {detail}")


class Rejected(Permanent):
    """A command refused by the domain (insufficient funds, account closed...).

    Raised in a command handler, it is not retried: the sender waiting for the reply gets it
    back as a :class:`Rejected` with the same reason, and the command is acked.
    """


class ProjectionFailed(Exception):
    """A projection handler raised on a stored event. The read model and the projection's
    position hold everything before that event; the position never moves past it. The
    triggering message takes the usual path: retries, delayed redelivery, dead letters."""

    def __init__(self, projection: str, stream: str, version: int, position: int, type_: str):
        self.projection = projection
        self.stream = stream
        self.version = version
        self.position = position
        super().__init__(
            f"projection {projection!r} failed on {type_} {stream!r} v{version} "
            f"(position {position}); it stays at the event before"
        )
