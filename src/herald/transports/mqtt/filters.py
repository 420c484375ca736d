"""MQTT topic filters for ``subscribe(bind=...)`` (see :mod:`herald.transports.mqtt.transport`).

A group with ``bind`` patterns holds one shared subscription per filter. The broker delivers a
message once per matching subscription (Mosquitto 2 does so for shared ones too), so filters
of one group must not overlap, or a message matching two would be handled twice. No I/O.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["check_filter", "group_filters", "matches", "overlap"]


def check_filter(pattern: str) -> str:
    """Check an MQTT topic filter: ``/``-separated levels, ``+`` a whole level, ``#`` only
    the whole last level; not a shared-subscription filter itself (``$share/...``)."""
    levels = pattern.split("/")
    for i, level in enumerate(levels):
        bad = ("+" in level and level != "+") or (
            "#" in level and (level != "#" or i != len(levels) - 1)
        )
        if bad:
            raise ValueError(
                f"bind pattern {pattern!r} is not an MQTT topic filter: '+' stands for one "
                "whole level, '#' for the rest as the last level"
            )
    if levels[0] == "$share":
        raise ValueError(f"bind pattern {pattern!r}: give the filter; Herald adds $share/<group>")
    if len(pattern.encode()) > 65535:
        raise ValueError("bind pattern longer than an MQTT string (65535 bytes)")
    return pattern


def matches(pattern: str, topic: str) -> bool:
    """Whether the filter ``pattern`` matches the topic name ``topic`` (MQTT 5 §4.7; a filter
    starting with a wildcard does not match a ``$`` topic)."""
    a, b = pattern.split("/"), topic.split("/")
    if topic.startswith("$") and a[0] in ("+", "#"):
        return False
    for i, level in enumerate(a):
        if level == "#":
            return True  # also the parent level: "a/#" matches "a"
        if i >= len(b) or (level != "+" and level != b[i]):
            return False
    return len(a) == len(b)


def overlap(p: str, q: str) -> bool:
    """Whether some topic name matches both filters."""
    a, b = p.split("/"), q.split("/")
    for i in range(max(len(a), len(b))):
        x = a[i] if i < len(a) else None
        y = b[i] if i < len(b) else None
        if x == "#" or y == "#":
            return True
        if x is None or y is None:
            return False
        if x != "+" and y != "+" and x != y:
            return False
    return True


def group_filters(own: str, bind: Sequence[str]) -> list[str]:
    """The filters a group subscribes: the ``bind`` patterns plus its topic's own MQTT topic
    ``own`` unless a pattern matches it (what Herald publishes to the topic, a replayed dead
    letter among it, must reach the group). ``ValueError`` if two of them overlap."""
    for p in bind:
        check_filter(p)
    filters = list(bind) if any(matches(p, own) for p in bind) else [own, *bind]
    for i, p in enumerate(filters):
        for q in filters[i + 1 :]:
            if overlap(p, q):
                raise ValueError(
                    f"bind patterns {p!r} and {q!r} overlap: a message matching both would be "
                    "delivered to the group twice (once per subscription); use patterns that "
                    "match disjoint topics"
                )
    return filters
