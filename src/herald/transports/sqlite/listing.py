"""What a SQLite broker holds: its topics and their groups (:meth:`SqliteTransport.list_topics`).

Plain reads of the ``messages``, ``groups`` and ``leases`` tables (the schema is in
:mod:`herald.transports.sqlite.transport`).
"""

from __future__ import annotations

import sqlite3

from herald.transports.base import GroupInfo, TopicInfo

__all__ = ["groups", "topics"]


def topics(conn: sqlite3.Connection) -> list[TopicInfo]:
    """In the worker thread: every topic with retained messages or a group."""
    counts: dict[str, int] = dict(
        conn.execute("SELECT topic, count(*) FROM messages GROUP BY topic").fetchall()
    )
    for (topic,) in conn.execute("SELECT DISTINCT topic FROM groups"):
        counts.setdefault(topic, 0)
    return [TopicInfo(name, messages=n) for name, n in sorted(counts.items())]


def groups(conn: sqlite3.Connection, topic: str) -> list[GroupInfo]:
    """In the worker thread: the groups of ``topic``; ``lag`` counts the messages after the
    group's cursor, ``pending`` its leases (handed out, or waiting to be handed out again)."""
    rows = conn.execute(
        "SELECT g.grp,"
        " (SELECT count(*) FROM messages m WHERE m.topic = g.topic AND m.seq > g.cursor),"
        " (SELECT count(*) FROM leases l WHERE l.topic = g.topic AND l.grp = g.grp)"
        " FROM groups g WHERE g.topic = ? ORDER BY g.grp",
        (topic,),
    ).fetchall()
    return [GroupInfo(name, lag=lag, pending=pending) for name, lag, pending in rows]
