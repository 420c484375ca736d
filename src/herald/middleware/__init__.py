"""Middleware: code around every handler call. One file per middleware.

``Retry`` and the dead letters form the failure path every subscriber has by default; the
others are opt-in, app-wide (``App(middleware=[...])``) or per subscriber. ``Dedupe`` is what
``subscriber(dedupe=...)`` installs; pass one yourself to configure it. Every middleware is
importable from here; the dead-letter naming stays in :mod:`herald.middleware.deadletter`.
"""

from herald.middleware.base import CallNext, Middleware
from herald.middleware.circuit import CircuitBreaker
from herald.middleware.dedupe import Dedupe
from herald.middleware.inflight import MaxInFlight
from herald.middleware.ratelimit import RateLimit
from herald.middleware.retry import Retry
from herald.middleware.timeout import Timeout

__all__ = [
    "CallNext",
    "CircuitBreaker",
    "Dedupe",
    "MaxInFlight",
    "Middleware",
    "RateLimit",
    "Retry",
    "Timeout",
]
