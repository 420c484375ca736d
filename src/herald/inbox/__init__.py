"""Idempotent-consumer stores. Engines load lazily so the core installs light.

``from herald.inbox import SqliteInbox`` (or ``PostgresInbox``, ``RedisInbox``) imports that
store's module on first use; importing :mod:`herald.inbox` itself never imports ``redis`` or
``psycopg``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from herald.inbox.base import DEFAULT_RETENTION, InboxStore
from herald.inbox.memory import MemoryInbox

if TYPE_CHECKING:
    from herald.inbox.postgres import PostgresInbox
    from herald.inbox.redis import RedisInbox
    from herald.inbox.sqlite import SqliteInbox

__all__ = [
    "DEFAULT_RETENTION",
    "InboxStore",
    "MemoryInbox",
    "PostgresInbox",
    "RedisInbox",
    "SqliteInbox",
]

_LAZY = {
    "SqliteInbox": "herald.inbox.sqlite",
    "PostgresInbox": "herald.inbox.postgres",
    "RedisInbox": "herald.inbox.redis",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
