"""Parsing ``sqlite:///path.db?option=value`` URLs for the SQLite transport.

The options are documented in :mod:`herald.transports.sqlite.transport`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, unquote

__all__ = ["SqliteOptions", "parse_sqlite_url"]


@dataclass(frozen=True, slots=True)
class SqliteOptions:
    path: str
    visibility_timeout: float = 30.0
    synchronous: str = "full"
    poll_interval: float = 0.05
    busy_timeout: float = 5.0


def _seconds(name: str, raw: str, *, minimum: float, allow_zero: bool = False) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"sqlite URL option {name}={raw!r} is not a number of seconds") from None
    if not math.isfinite(value) or value < minimum or (value == minimum and not allow_zero):
        bound = f">= {minimum:g}" if allow_zero else f"> {minimum:g}"
        raise ValueError(f"sqlite URL option {name}={raw!r} must be a finite number {bound}")
    return value


def parse_sqlite_url(url: str) -> SqliteOptions:
    """Parse and validate a ``sqlite://`` URL; raise ``ValueError`` saying what is wrong."""
    if not isinstance(url, str) or not url.lower().startswith("sqlite://"):
        raise ValueError(f"not a sqlite URL: {url!r}; expected sqlite:///path/to/file.db")
    rest = url[len("sqlite://") :]
    if "#" in rest:
        raise ValueError(f"sqlite URL {url!r} must not have a #fragment")
    location, _, query = rest.partition("?")
    if not location.startswith("/"):
        raise ValueError(
            f"sqlite URL {url!r} has a host part; use sqlite:///relative/path.db or "
            "sqlite:////absolute/path.db"
        )
    path = unquote(location[1:])
    if not path or path.endswith("/"):
        raise ValueError(f"sqlite URL {url!r} names no database file")
    if path == ":memory:" or path.startswith("file:") or "mode=memory" in query:
        raise ValueError(
            f"sqlite URL {url!r}: an in-memory SQLite database cannot be shared between "
            "processes; use memory:// for an in-process bus"
        )
    options: dict[str, Any] = {}
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=True) if query else []
    except ValueError:
        raise ValueError(f"sqlite URL {url!r} has a malformed query string") from None
    for name, raw in pairs:
        if name in options:
            raise ValueError(f"sqlite URL option {name!r} is given twice")
        if name in ("visibility_timeout", "poll_interval"):
            options[name] = _seconds(name, raw, minimum=0.0)
        elif name == "busy_timeout":
            options[name] = _seconds(name, raw, minimum=0.0, allow_zero=True)
        elif name == "synchronous":
            if raw.lower() not in ("full", "normal"):
                raise ValueError(f"sqlite URL option synchronous={raw!r} must be full or normal")
            options[name] = raw.lower()
        else:
            raise ValueError(
                f"unknown sqlite URL option {name!r}; known: busy_timeout, poll_interval, "
                "synchronous, visibility_timeout"
            )
    return SqliteOptions(path=path, **options)
