"""Redis Streams (``redis://``, ``rediss://``).

The mapping onto the engine, URL options and wire format: :mod:`herald.transports.redis.transport`.
"""

from herald.transports.redis.transport import RedisTransport

__all__ = ["RedisTransport"]
