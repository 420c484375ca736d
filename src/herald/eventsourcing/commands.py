"""CQRS commands: typed messages with one handler, answered to a sender that waits.

::

    commands = Commands(app, topic="bank.commands")

    @commands.handler
    async def deposit(cmd: Deposit) -> int:              # (cmd) or (cmd, ctx)
        acc = await accounts.update(cmd.account, lambda a: a.deposit(cmd.amount))
        return acc.balance                                # the reply

    balance = await commands.send(Deposit(account="acc-1", amount=50), key="acc-1")

A handler is an App subscriber of the command topic (group ``<app>.commands``): it gets the
App's retries and dead letters, ``herald run`` runs it, and the command's type picks the
handler (one handler per command type). Events the handler saves through a
:class:`~herald.eventsourcing.Repository` carry the command's correlation id and the command as
their cause.

Replies (:mod:`herald.eventsourcing.replies`): the return value goes back to a sender that
used :meth:`Commands.send`. A handler raising :class:`~herald.eventsourcing.Rejected` (or an
exception in ``reject_on``) is a *rejection*: not retried, the command is acked, and the
sender's ``send`` raises ``Rejected`` with the same reason. Other errors take the App's
failure path (retries, then dead letters); the waiting sender gets ``TimeoutError``.
:meth:`Commands.send_nowait` publishes without waiting.

Queries do not go through here: they read read models directly
(:class:`~herald.eventsourcing.ReadModel`).
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, get_type_hints

from herald.app import App
from herald.codec import decoder_for
from herald.context import Context
from herald.eventsourcing.causation import caused_by
from herald.eventsourcing.errors import Rejected
from herald.eventsourcing.replies import REPLY_STATUS, Replies, reply
from herald.transports import validate_name

__all__ = ["Commands"]

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


class Commands:
    """The commands of one topic; see the module docstring."""

    def __init__(
        self,
        app: App,
        topic: str = "commands",
        *,
        reject_on: tuple[type[Exception], ...] = (Rejected,),
    ) -> None:
        self.app = app
        self.topic = validate_name("topic", topic)
        self.group = f"{app.name}.commands"
        self.reject_on = reject_on
        self.replies = Replies.for_app(app)

    def handler(self, func: F) -> F:
        """Register ``func`` (async, ``(command)`` or ``(command, ctx)``) as the handler of
        the command class it is annotated with."""
        if not inspect.iscoroutinefunction(_any(func)):
            raise TypeError("a command handler must be an async function")
        params = list(inspect.signature(func).parameters.values())
        hints = get_type_hints(func)
        if not params or params[0].name not in hints:
            raise TypeError(f"{func.__qualname__}: annotate the command parameter")
        wants_ctx = len(params) > 1
        reject_on = self.reject_on

        async def handle(command: Any, ctx: Context) -> None:
            try:
                with caused_by(ctx):
                    result = await (func(command, ctx) if wants_ctx else func(command))
            except reject_on as e:
                await reply(ctx, str(e), status="rejected")
                return
            await reply(ctx, result)

        handle.__annotations__ = {"command": hints[params[0].name], "ctx": Context}
        handle.__module__ = func.__module__
        handle.__qualname__ = func.__qualname__
        handle.__name__ = func.__name__
        self.app.subscriber(self.topic, group=self.group)(handle)
        return func

    async def send(
        self,
        command: Any,
        *,
        key: str | None = None,
        returns: Any = Any,
        timeout: float = 10.0,
    ) -> Any:
        """Send ``command`` and wait for its result (decoded as ``returns``). Raises
        :class:`Rejected` with the handler's reason, or ``TimeoutError``."""
        answer = await self.replies.request(self.topic, command, key=key, timeout=timeout)
        if answer.headers.get(REPLY_STATUS) == "rejected":
            raise Rejected(answer.payload.decode("utf-8", "replace"))
        return decoder_for(returns)(answer)

    async def send_nowait(self, command: Any, *, key: str | None = None) -> str:
        """Publish ``command`` without waiting for a result; return its message id."""
        return await self.app.publish(self.topic, command, key=key)


def _any(value: object) -> Any:
    return value
