"""RabbitMQ (``amqp://``, ``amqps://``).

Mapping onto the engine, URL options and wire format: :mod:`herald.transports.rabbitmq.transport`.
"""

from herald.transports.rabbitmq.transport import RabbitMQTransport

__all__ = ["RabbitMQTransport"]
