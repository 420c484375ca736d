"""The per-delivery context a handler may ask for by annotating a parameter with ``Context``."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio.from_thread

from herald.app_like import AppLike
from herald.errors import CascadeLimitExceeded
from herald.message import (
    CAUSATION_ID,
    CORRELATION_ID,
    HOPS,
    OCCURRED_AT,
    SCHEMA_VERSION,
    Message,
)
from herald.scheduler import due_time, to_schedule

__all__ = ["INHERIT", "Context", "InheritKey"]


class InheritKey:
    """Type of :data:`INHERIT`: "use the key of the message being handled"."""

    def __repr__(self) -> str:
        return "INHERIT"


INHERIT = InheritKey()


class Context:
    """What a handler knows about the delivery it is handling, and how it publishes causally.

    ``ctx.publish`` keeps the chain of events traceable: the new message carries this
    message's ``correlation_id``, has this message's id as its ``causation_id``, and one more
    hop (the cascade guard counts hops). It returns once the broker holds the message, so a
    handler that returns has had all its publishes stored before its delivery is acked.
    """

    __slots__ = ("app", "attempt", "group", "handler", "message", "outbox", "state")

    def __init__(
        self, app: AppLike, message: Message, attempt: int, group: str, handler: str = ""
    ) -> None:
        self.app = app
        self.message = message
        self.attempt = attempt
        self.group = group
        #: the handler's qualified name (set when middleware runs)
        self.handler = handler
        #: scratch space for middleware to hand things to the handler (e.g. a transaction)
        self.state: dict[str, Any] = {}
        #: a transactional subscriber's publishes, held until they commit with the ack
        self.outbox: list[Message] | None = None

    @property
    def correlation_id(self) -> str:
        return self.message.correlation_id

    @property
    def headers(self) -> Mapping[str, str]:
        return self.message.headers

    @property
    def occurred_at(self) -> datetime | None:
        """When the event occurred, from the ``occurred_at`` header, as an aware UTC datetime.
        None when the header is missing or not an RFC 3339 time with an offset (e.g. a plain
        client's message): the broker's receive time is not the event's time, so none is
        invented."""
        raw = self.message.headers.get(OCCURRED_AT)
        if not raw:
            return None
        try:
            t = datetime.fromisoformat(raw)
        except ValueError:
            return None
        return None if t.tzinfo is None else t.astimezone(UTC)

    @property
    def schema_version(self) -> int | None:
        """The ``schema_version`` header (set on publish from the event class's declared
        version, :func:`herald.codec.schema_version`), or None if missing or not an int >= 1."""
        raw = self.message.headers.get(SCHEMA_VERSION)
        if raw is None or not raw.isdigit():
            return None
        v = int(raw)
        return v if v >= 1 else None

    @property
    def transaction(self) -> Any:
        """The inbox transaction of a ``dedupe`` subscriber in transactional mode (else None):
        writes through it commit atomically with the record that this message was handled."""
        return self.state.get("transaction")

    def causal_headers(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """Headers linking a new message to this one: correlation, causation, hop count."""
        m = self.message
        try:
            hops = int(m.headers.get(HOPS) or 0) + 1
        except ValueError:
            hops = 1  # a plain client's nonsense header does not break the chain
        limit = self.app.cascade_limit
        if hops > limit:
            raise CascadeLimitExceeded(
                f"publishing from {m.id} would be causal hop {hops}, over the cascade limit "
                f"{limit}: an event cascade is feeding itself"
            )
        h = {CORRELATION_ID: m.correlation_id, CAUSATION_ID: m.id, HOPS: str(hops)}
        if extra:
            h.update(extra)
        return h

    async def publish(
        self,
        topic: str,
        event: Any,
        *,
        key: str | InheritKey | None = INHERIT,
        headers: Mapping[str, str] | None = None,
        type: str | None = None,
        delay: timedelta | float | None = None,
        at: datetime | None = None,
    ) -> str:
        """Publish ``event`` to ``topic`` as a consequence of this message; return its id.

        The key defaults to this message's key, so a chain of events about one entity keeps
        its per-key order; pass ``key=None`` for no key. ``delay``/``at`` schedule it as in
        :meth:`App.publish <herald.App.publish>`; in a transactional subscriber the scheduled
        message is committed with the ack like any other.
        """
        if isinstance(key, InheritKey):
            key = self.message.key
        causal = self.causal_headers(headers)
        if self.outbox is not None:  # transactional: published with the ack, or not at all
            due = due_time(delay, at)
            msg = self.app.message(topic, event, key=key, headers=causal, type=type)
            self.outbox.extend(to_schedule([msg], due, self.app.schedule_topic))
            return msg.id
        return await self.app.publish(
            topic, event, key=key, headers=causal, type=type, delay=delay, at=at
        )

    def publish_sync(
        self,
        topic: str,
        event: Any,
        *,
        key: str | InheritKey | None = INHERIT,
        headers: Mapping[str, str] | None = None,
        type: str | None = None,
        delay: timedelta | float | None = None,
        at: datetime | None = None,
    ) -> str:
        """:meth:`publish` for synchronous handlers (they run in a worker thread)."""
        return anyio.from_thread.run(
            lambda: self.publish(
                topic, event, key=key, headers=headers, type=type, delay=delay, at=at
            )
        )

    def __repr__(self) -> str:
        m = self.message
        return (
            f"Context(topic={m.topic!r}, group={self.group!r}, id={m.id!r}, attempt={self.attempt})"
        )
