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

import anyio

__all__ = ["DEFAULT_RETENTION", "InboxStore"]

DEFAULT_RETENTION = 7 * 24 * 3600.0


class InboxStore(ABC):
    """Remembers ``(group, key)`` pairs for ``retention`` seconds; one store serves many groups."""

    retention: float = DEFAULT_RETENTION
    # several users (apps, tools) may share one store: the first open connects, the last
    # close disconnects
    _users: int = 0
    _lifecycle: anyio.Lock | None = None

    async def open(self) -> None:
        """Count a user; the first one connects and creates what is missing. Raises
        :class:`~herald.TransportError` (credentials redacted) if that fails."""
        async with self._lifecycle_lock():
            if self._users == 0:
                await self._acquire()
            self._users += 1

    async def close(self) -> None:
        """Release a user's hold; the last one's close closes the connections. Calling it more
        often than :meth:`open` is harmless."""
        async with self._lifecycle_lock():
            if self._users == 0:
                return
            self._users -= 1
            if self._users == 0:
                with anyio.CancelScope(shield=True):  # never leave connections half closed
                    await self._release()

    def _lifecycle_lock(self) -> anyio.Lock:
        if self._lifecycle is None:
            self._lifecycle = anyio.Lock()
        return self._lifecycle

    async def _acquire(self) -> None:
        """Open the store's connections and create what is missing (the first user).
        Stores without connections (MemoryInbox) keep this no-op."""
        return None

    async def _release(self) -> None:
        """Close the store's connections (the last user); runs shielded."""
        return None

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
