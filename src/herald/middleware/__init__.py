"""Middleware: code around every handler call. One file per middleware.

``Retry`` and the dead letters form the failure path every subscriber has by default; the
others are opt-in, app-wide (``App(middleware=[...])``) or per subscriber.
"""

from herald.middleware.base import CallNext, Middleware
from herald.middleware.circuit import CircuitBreaker
from herald.middleware.inflight import MaxInFlight
from herald.middleware.ratelimit import RateLimit
from herald.middleware.retry import Retry
from herald.middleware.timeout import Timeout

__all__ = [
    "CallNext",
    "CircuitBreaker",
    "MaxInFlight",
    "Middleware",
    "RateLimit",
    "Retry",
    "Timeout",
]
