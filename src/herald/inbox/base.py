"""The inbox contract: a store of the message keys a group has handled.

The :class:`~herald.middleware.dedupe.Dedupe` middleware uses a store to make handling
effectively-once: a redelivered message whose key is recorded is acked without running the
handler again. Two ways to use a store:

* **Record after success** (default): :meth:`InboxStore.seen` before the handler;
  :meth:`InboxStore.record` for the batch of handled keys just before their acks. Fast (one
  lookup per message, one write per batch). A crash between a handler's success and the record
  means the handler runs once more.
* **Transactional**: :meth:`InboxStore.transaction` claims the key inside a new database
  transaction and hands the handler that transaction (``ctx.transaction``). The handler's own
  writes and the inbox record commit together or not at all: exactly-once effect on that
  database, even across crashes.

Records older than ``retention`` seconds may be purged; a duplicate arriving later than that is
handled again.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any

__all__ = ["DEFAULT_RETENTION", "InboxStore"]

DEFAULT_RETENTION = 7 * 24 * 3600.0


class InboxStore(ABC):
    """Remembers ``(group, key)`` pairs for ``retention`` seconds; one store serves many groups."""

    retention: float = DEFAULT_RETENTION

    @abstractmethod
    async def open(self) -> None:
        """Connect and create what is missing. Called once per user; must be idempotent."""

    @abstractmethod
    async def close(self) -> None:
        """Release connections. Idempotent."""

    @abstractmethod
    async def seen(self, group: str, key: str) -> bool:
        """Whether ``key`` is recorded for ``group`` (and not yet purged)."""

    @abstractmethod
    async def record(self, group: str, keys: Sequence[str]) -> None:
        """Record ``keys`` for ``group``; durable when this returns. Recording twice is fine."""

    @abstractmethod
    def transaction(self, group: str, key: str) -> AbstractAsyncContextManager[Any | None]:
        """Claim ``key`` in a new transaction.

        Yields the transaction handle (the store's connection, for the handler's own writes) if
        the key was new, or ``None`` if it is already recorded. On a clean exit the claim and
        the handler's writes commit together; on an exception both roll back.
        """

    @abstractmethod
    async def purge(self) -> int:
        """Delete records older than ``retention``; return how many."""
