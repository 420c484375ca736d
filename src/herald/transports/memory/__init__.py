"""The in-process bus (``memory://``).

The mapping onto the engine, URL options and wire format: :mod:`herald.transports.memory.transport`.
"""

from herald.transports.memory.transport import MemoryTransport

__all__ = ["MemoryTransport"]
