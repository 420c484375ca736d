"""Herald: typed event-driven messaging over an in-process bus, embedded SQLite and real brokers."""

from herald.app import App
from herald.codec import event_type
from herald.context import Context
from herald.errors import DecodeError, Permanent
from herald.message import Message
from herald.middleware.deadletter import dead_letter_topic
from herald.middleware.retry import Retry
from herald.transports import (
    Delivery,
    Features,
    PermanentTransportError,
    Subscription,
    Transport,
    TransportError,
)

__all__ = [
    "App",
    "Context",
    "DecodeError",
    "Delivery",
    "Features",
    "Message",
    "Permanent",
    "PermanentTransportError",
    "Retry",
    "Subscription",
    "Transport",
    "TransportError",
    "dead_letter_topic",
    "event_type",
]

__version__ = "0.1.0"
