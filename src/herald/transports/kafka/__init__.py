"""Kafka and Kafka-protocol brokers (``kafka://``).

The mapping onto the engine, URL options and wire format: :mod:`herald.transports.kafka.transport`.
"""

from herald.transports.kafka.transport import KafkaTransport

__all__ = ["KafkaTransport"]
