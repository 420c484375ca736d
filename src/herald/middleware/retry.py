"""Retry policy: in-process attempts with backoff, then delayed redelivery through the transport.

A failing handler call is retried in-process ``attempts`` times in all, sleeping an
exponentially growing, fully jittered delay between tries (fast recovery from blips). If it
still fails, the delivery is nacked with a delay so the transport redelivers it later — this
survives a restart of the worker — until the message has been delivered ``deliveries`` times.
Then it goes to the dead letters. Exceptions in ``give_up_on`` (and :class:`herald.Permanent`,
and payloads that do not decode) go to the dead letters at once.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio

from herald.errors import Permanent
from herald.middleware.base import CallNext, Middleware

if TYPE_CHECKING:
    from herald.context import Context

__all__ = ["DEFAULT_RETRY", "Retry"]


@dataclass(frozen=True, slots=True)
class Retry(Middleware):
    """How hard to try before dead-lettering. Per app, overridable per subscriber.

    Given as ``App(retry=...)`` or ``subscriber(retry=...)``, the in-process retries wrap the
    handler directly (innermost). Listed in ``middleware=[...]``, they run where listed, so
    ``[CircuitBreaker(), Timeout(2), Retry()]`` retries inside the timeout inside the breaker.
    """

    #: handler calls per delivery (1 = no in-process retry)
    attempts: int = 3
    #: first in-process backoff, seconds; doubles (``factor``) each time, capped at ``max_delay``
    delay: float = 0.05
    factor: float = 2.0
    max_delay: float = 2.0
    #: deliveries of one message (through ``nack(delay=)``) before it is dead-lettered
    deliveries: int = 5
    #: delay before the first redelivery; grows by ``factor``, capped at ``max_redelivery_delay``
    redelivery_delay: float = 1.0
    max_redelivery_delay: float = 300.0
    #: only these exceptions are retried; others are dead-lettered at once
    retry_on: tuple[type[BaseException], ...] = (Exception,)
    #: never retried, even if they match ``retry_on``
    give_up_on: tuple[type[BaseException], ...] = ()

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.deliveries < 1:
            raise ValueError("Retry attempts and deliveries must be at least 1")
        if min(self.delay, self.max_delay, self.redelivery_delay, self.max_redelivery_delay) < 0:
            raise ValueError("Retry delays must not be negative")
        if self.factor < 1:
            raise ValueError("Retry factor must be at least 1")

    def retryable(self, exc: BaseException) -> bool:
        """Whether ``exc`` is worth another try (not Permanent, not given up on)."""
        if isinstance(exc, (Permanent, *self.give_up_on)):
            return False
        return isinstance(exc, self.retry_on)

    async def handle(self, ctx: Context, call_next: CallNext) -> Any:
        """Call up to ``attempts`` times, sleeping :meth:`backoff` between failures."""
        try:
            return await call_next()
        except Exception as e:
            return await self.again(e, call_next)

    async def again(self, error: Exception, call_next: CallNext) -> Any:
        """Go on after a first failed call with ``error``: the rest of :meth:`handle`'s tries.

        Re-raises the last error when the tries run out or an error is not retryable.
        """
        failures = 1
        while failures < self.attempts and self.retryable(error):
            await anyio.sleep(self.backoff(failures))
            try:
                return await call_next()
            except Exception as e:
                error = e
                failures += 1
        raise error

    def backoff(self, failures: int) -> float:
        """In-process sleep after the ``failures``-th failed call (full jitter)."""
        cap = min(self.max_delay, self.delay * self.factor ** (failures - 1))
        return random.uniform(0, cap)

    def redelivery_backoff(self, delivery_attempt: int) -> float:
        """Delay before delivering again after delivery number ``delivery_attempt`` failed.

        Jittered between half and the full exponential value, so a burst of failures spreads
        out without ever retrying sooner than half the configured delay.
        """
        base = self.redelivery_delay * self.factor ** (delivery_attempt - 1)
        cap = min(self.max_redelivery_delay, base)
        return random.uniform(cap / 2, cap)


#: Used when neither the app nor the subscriber says otherwise.
DEFAULT_RETRY = Retry()
