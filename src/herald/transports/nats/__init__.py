"""NATS JetStream (``nats://``, ``tls://``).

The mapping onto the engine, URL options and wire format: :mod:`herald.transports.nats.transport`.
"""

from herald.transports.nats.transport import NatsTransport, PayloadTooLarge

__all__ = ["NatsTransport", "PayloadTooLarge"]
