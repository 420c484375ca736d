"""The message envelope every layer speaks, and the names of its standard headers.

A :class:`Message` is what a transport stores and delivers: an id, the topic, an optional key
(ordering / partition key), an optional event ``type`` name, the payload bytes, and string headers.
The payload is opaque to transports; the codec layer turns it into typed events.

Ids are UUIDv7 strings (time-ordered, so they sort by creation time). Timestamps in headers are
UTC RFC 3339 with millisecond precision, e.g. ``2026-11-25T10:00:00.123Z``.
"""

from __future__ import annotations

import random
import time
from datetime import UTC, datetime

import msgspec

__all__ = [
    "CAUSATION_ID",
    "CONTENT_TYPE",
    "CORRELATION_ID",
    "HOPS",
    "OCCURRED_AT",
    "SCHEMA_VERSION",
    "SOURCE",
    "TRACEPARENT",
    "Message",
    "new_id",
    "new_ids",
    "utc_now_rfc3339",
]

# Standard header names. They travel as native broker headers where the broker has them.
CORRELATION_ID = "correlation_id"
CAUSATION_ID = "causation_id"
OCCURRED_AT = "occurred_at"
SOURCE = "source"
CONTENT_TYPE = "content_type"
SCHEMA_VERSION = "schema_version"
TRACEPARENT = "traceparent"
#: Number of causal publishes between the original event and this one (cascade guard).
HOPS = "hops"


class Message(msgspec.Struct, kw_only=True):
    """One event on the wire.

    ``payload`` is bytes exactly as published; ``headers`` maps str to str. A message is
    immutable by convention: middleware that changes headers builds a new one with
    :meth:`replace`.
    """

    id: str
    topic: str
    payload: bytes
    key: str | None = None
    type: str | None = None
    headers: dict[str, str] = msgspec.field(default_factory=dict)

    def replace(self, **changes: object) -> Message:
        """Return a copy with the given fields replaced."""
        return msgspec.structs.replace(self, **changes)

    @property
    def correlation_id(self) -> str:
        """The correlation id, falling back to the message id for a root event."""
        return self.headers.get(CORRELATION_ID) or self.id


# --- UUIDv7 -------------------------------------------------------------------------------
# Python 3.11 has no uuid7, and ids are made on the publish hot path, so this formats strings
# directly. Layout (RFC 9562, "monotonic random" method): 48 bits of Unix milliseconds,
# version 7, 12 random bits, variant 10, 62 bits whose low 48 start at a random value each
# millisecond and count up. So ids sort by creation within a process, and two processes
# differ in ~64 random bits per millisecond. Only the low 48 bits are formatted per call.

_getrandbits = random.SystemRandom().getrandbits
_last_ms = -1
_head = ""  # "tttttttt-tttt-7rrr-vrrr-" for _last_ms
_low = 0
_LOW_MAX = 0xFFFFFFFFFFFF


def _new_head(ms: int) -> None:
    global _last_ms, _head, _low
    r = _getrandbits(64)
    _last_ms = ms
    _head = f"{ms >> 16:08x}-{ms & 0xFFFF:04x}-7{r >> 52:03x}-{0x8000 | (r >> 38) & 0x3FFF:04x}-"
    _low = r & 0x3FFFFFFFFF  # start low in the 48-bit space: 2**48 - 2**38 ids of headroom


def new_id() -> str:
    """Return a new UUIDv7 as a canonical lowercase string; monotonic within a process."""
    global _low
    ms = time.time_ns() // 1_000_000
    if ms > _last_ms:
        _new_head(ms)
    else:  # same millisecond (or the clock stepped back): count up
        _low += 1
        if _low > _LOW_MAX:
            _new_head(_last_ms + 1)
    return f"{_head}{_low:012x}"


def new_ids(count: int) -> list[str]:
    """Return ``count`` new ids at once: like ``new_id()`` repeated, at a fraction of the cost."""
    global _low
    ms = time.time_ns() // 1_000_000
    if ms > _last_ms:
        _new_head(ms)
        _low -= 1  # the first id of a new head uses its start value
    if _low + count > _LOW_MAX:
        _new_head(_last_ms + 1)
        _low -= 1
    first = _low + 1
    _low += count
    head = _head
    return [f"{head}{n:012x}" for n in range(first, first + count)]


# --- timestamps ----------------------------------------------------------------------------
_ts_ms = -1
_ts_str = ""


def utc_now_rfc3339() -> str:
    """Return the current UTC time as RFC 3339 with milliseconds and a ``Z`` suffix."""
    global _ts_ms, _ts_str
    ms = time.time_ns() // 1_000_000
    if ms != _ts_ms:  # formatting a datetime costs more than the rest of a publish; cache per ms
        _ts_ms = ms
        dt = datetime.fromtimestamp(ms / 1000, tz=UTC)
        _ts_str = dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"
    return _ts_str
