"""MQTT 5 (``mqtt://``, ``mqtts://``).

The mapping onto the engine, URL options and wire format: :mod:`herald.transports.mqtt.transport`.
"""

from herald.transports.mqtt.transport import MqttTransport

__all__ = ["MqttTransport"]
