"""The embedded durable broker (``sqlite:///path.db``).

The mapping onto the engine, URL options and wire format: :mod:`herald.transports.sqlite.transport`.
"""

from herald.transports.sqlite.transport import SqliteTransport

__all__ = ["SqliteTransport"]
