"""Request/reply on the App API: a sender waits for the answer to one message.

Generic (it knows nothing of event sourcing) so the task issue's ``app.request`` can build on
it. Each app gets one reply topic of its own process (``<app>.replies.<random>``, deleted when
the app stops); a request carries the header ``reply_to`` naming it, and the responder
publishes its answer there with ``in_reply_to`` = the request's message id and
``reply_status`` = ``ok`` or ``rejected``. Replies are demultiplexed by that id, so any number
of requests wait concurrently. A request that gets no answer in ``timeout`` seconds raises
``TimeoutError``; a reply arriving later is dropped with a debug log.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Mapping
from typing import Any

import anyio

from herald.app import App
from herald.context import Context
from herald.message import Message, new_id

__all__ = ["IN_REPLY_TO", "REPLY_STATUS", "REPLY_TO", "Replies", "reply"]

log = logging.getLogger("herald.replies")

REPLY_TO = "reply_to"
IN_REPLY_TO = "in_reply_to"
REPLY_STATUS = "reply_status"

_by_app: weakref.WeakKeyDictionary[App, Replies] = weakref.WeakKeyDictionary()


class _Waiter:
    __slots__ = ("done", "reply")

    def __init__(self) -> None:
        self.done = anyio.Event()
        self.reply: Message | None = None


class Replies:
    """The reply path of one app. Use :meth:`for_app` before the app starts."""

    def __init__(self, app: App) -> None:
        self.app = app
        self.topic = f"{app.name}.replies.{new_id()[-12:]}"
        self._waiting: dict[str, _Waiter] = {}
        app.subscriber(self.topic, group=app.name)(self._on_reply)
        app.on_shutdown(self._drop_topic)

    @classmethod
    def for_app(cls, app: App) -> Replies:
        replies = _by_app.get(app)
        if replies is None:
            replies = _by_app[app] = cls(app)
        return replies

    async def request(
        self,
        topic: str,
        body: Any,
        *,
        key: str | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float = 10.0,
    ) -> Message:
        """Publish ``body`` to ``topic`` and return the reply message; ``TimeoutError`` after
        ``timeout`` seconds without one."""
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        msg = self.app.message(
            topic, body, key=key, headers={**(headers or {}), REPLY_TO: self.topic}
        )
        waiter = self._waiting[msg.id] = _Waiter()
        try:
            await self.app.transport.publish(topic, [msg])
            with anyio.move_on_after(timeout):
                await waiter.done.wait()
        finally:
            self._waiting.pop(msg.id, None)
        if waiter.reply is None:
            raise TimeoutError(f"no reply to {msg.id} on {topic!r} within {timeout:g}s")
        return waiter.reply

    async def _on_reply(self, message: Message) -> None:
        waiter = self._waiting.get(message.headers.get(IN_REPLY_TO, ""))
        if waiter is None:
            log.debug("dropping a late or unknown reply %s", message.id)
            return
        waiter.reply = message
        waiter.done.set()

    async def _drop_topic(self) -> None:
        try:
            await self.app.transport.delete_topic(self.topic)
        except Exception as e:  # a leftover reply topic is harmless
            log.debug("could not delete reply topic %s: %s", self.topic, e)


async def reply(ctx: Context, value: Any, *, status: str = "ok") -> bool:
    """Answer the request ``ctx`` is handling, if its sender asked for a reply (``reply_to``);
    return whether a reply was sent."""
    to = ctx.headers.get(REPLY_TO)
    if not to:
        return False
    await ctx.publish(
        to, value, key=None, headers={IN_REPLY_TO: ctx.message.id, REPLY_STATUS: status}
    )
    return True
