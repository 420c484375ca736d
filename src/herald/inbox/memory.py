"""In-process inbox: for the memory transport and tests. Forgets everything on exit."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import anyio

from herald.inbox.base import DEFAULT_RETENTION, InboxStore

__all__ = ["MemoryInbox"]


class MemoryInbox(InboxStore):
    def __init__(self, retention: float = DEFAULT_RETENTION) -> None:
        self.retention = retention
        self._at: dict[tuple[str, str], float] = {}
        self._lock = anyio.Lock()

    async def seen(self, group: str, key: str) -> bool:
        return (group, key) in self._at

    async def record(self, group: str, keys: Sequence[str]) -> None:
        now = time.time()
        for k in keys:
            self._at.setdefault((group, k), now)

    @asynccontextmanager
    async def transaction(self, group: str, key: str) -> AsyncIterator[Any | None]:
        # one transaction at a time, like a database write lock
        async with self._lock:
            if (group, key) in self._at:
                yield None
                return
            yield self
            self._at[(group, key)] = time.time()  # only reached on a clean exit

    async def purge(self) -> int:
        cutoff = time.time() - self.retention
        old = [k for k, at in self._at.items() if at < cutoff]
        for k in old:
            del self._at[k]
        return len(old)
