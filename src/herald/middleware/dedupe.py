"""Dedupe: the idempotent consumer. A message whose key the group already handled is acked
without running the handler again.

The key is the message id unless ``key=`` derives one from the message (e.g. a business id in
a header). See :mod:`herald.inbox.base` for the two modes: record-after-success (default) and
``transactional=True``, where the handler's writes through ``ctx.transaction`` commit in the
same transaction as the inbox record.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from herald.inbox.base import InboxStore
from herald.message import Message
from herald.middleware.base import CallNext, Middleware

if TYPE_CHECKING:
    from herald.context import Context

__all__ = ["Dedupe"]

_PURGE_EVERY = 600.0  # seconds between retention purges per group


class Dedupe(Middleware):
    def __init__(
        self,
        store: InboxStore,
        *,
        key: Callable[[Message], str] | None = None,
        transactional: bool = False,
    ) -> None:
        if not isinstance(store, InboxStore):
            raise TypeError(f"Dedupe needs an InboxStore, got {store!r}")
        self.store = store
        self.key = key
        self.transactional = transactional
        self.group = ""
        #: duplicates skipped by this group since start
        self.duplicates = 0
        self._pending: list[str] = []
        self._pending_set: set[str] = set()
        self._purged_at = 0.0

    def for_group(self, topic: str, group: str) -> Dedupe:
        d = Dedupe(self.store, key=self.key, transactional=self.transactional)
        d.group = group
        return d

    # The App opens and closes the store (one store may serve several groups).
    async def startup(self) -> None:
        await self._maybe_purge()

    async def shutdown(self) -> None:
        await self.before_ack()

    async def handle(self, ctx: Context, call_next: CallNext) -> Any:
        key = self.key(ctx.message) if self.key is not None else ctx.message.id
        if self.transactional:
            async with self.store.transaction(self.group, key) as tx:
                if tx is None:
                    self.duplicates += 1
                    return None
                ctx.state["transaction"] = tx
                return await call_next()
        if key in self._pending_set or await self.store.seen(self.group, key):
            self.duplicates += 1
            return None
        result = await call_next()
        self._pending.append(key)
        self._pending_set.add(key)
        return result

    async def before_ack(self) -> None:
        """Record the batch's handled keys before the batch is acked."""
        if self._pending:
            pending = self._pending
            self._pending, self._pending_set = [], set()
            await self.store.record(self.group, pending)
        await self._maybe_purge()

    async def _maybe_purge(self) -> None:
        now = time.monotonic()
        if now - self._purged_at >= _PURGE_EVERY:
            self._purged_at = now
            await self.store.purge()
