"""``AppLike``: the App as the layers below it see it.

The consumer loop (:mod:`herald.consumer`) and the handler context (:mod:`herald.context`) run
on behalf of an :class:`~herald.App`, but they sit below it: the App imports them, so they
must not import ``herald.app`` back (not even for type checking). They depend on this small
structural interface instead; :class:`herald.App` satisfies it, and mypy checks that where
the App hands itself to a consumer.

Add a member here only when one of those lower layers needs it.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any, Literal, Protocol

from herald.message import Message
from herald.transports.base import Transport

__all__ = ["AppLike"]


class AppLike(Protocol):
    """What :class:`~herald.consumer.GroupConsumer` and :class:`~herald.Context` use of the
    App: its transport, its limits, and building and publishing envelopes."""

    @property
    def transport(self) -> Transport:
        """The connected transport consumers fetch from and dead letters go to."""
        ...

    @property
    def max_payload(self) -> int:
        """Largest payload in bytes the app handles; larger ones are dead-lettered undecoded."""
        ...

    @property
    def cascade_limit(self) -> int:
        """Most causal hops a chain of ``ctx.publish`` may take."""
        ...

    @property
    def schedule_topic(self) -> str:
        """Where scheduled messages (``publish(..., delay=/at=)``) wait until due."""
        ...

    @property
    def unhandled(self) -> Literal["ack", "skip"]:
        """What a group does with a type none of its handlers takes."""
        ...

    def message(
        self,
        topic: str,
        event: Any,
        *,
        key: str | None = None,
        headers: Mapping[str, str] | None = None,
        type: str | None = None,
    ) -> Message:
        """Build the envelope :meth:`publish` would send, without sending it."""
        ...

    async def publish(
        self,
        topic: str,
        event: Any,
        *,
        key: str | None = None,
        headers: Mapping[str, str] | None = None,
        type: str | None = None,
        delay: timedelta | float | None = None,
        at: datetime | None = None,
    ) -> str:
        """Publish one event durably (delivered when due with ``delay``/``at``); return its
        message id."""
        ...
