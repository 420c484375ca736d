"""Exceptions users raise or catch. Transport failures are :class:`herald.TransportError`."""

from __future__ import annotations

__all__ = ["CascadeLimitExceeded", "DecodeError", "Permanent"]


class Permanent(Exception):
    """Raise (or subclass) this in a handler for a failure that retrying cannot fix.

    The message goes to the dead letters at once instead of being retried.
    """


class DecodeError(Permanent, ValueError):
    """A payload could not be turned into the handler's type (bad bytes, wrong schema)."""


class CascadeLimitExceeded(Permanent):
    """A handler tried to publish past the app's ``cascade_limit`` of causal hops.

    Raised by ``ctx.publish``; the message being handled is dead-lettered with reason
    ``"cascade limit"`` and the runaway chain stops there.
    """

    dlq_reason = "cascade limit"
