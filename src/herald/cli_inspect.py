"""``herald tail``, ``herald topics``, ``herald groups``: read-only views of a broker.

None of them joins or changes a group (see :meth:`herald.Transport.peek` and
:meth:`herald.Transport.list_topics`): what each group receives is the same whether they run or
not. The broker rule is in :mod:`herald.cli_common`.
"""

from __future__ import annotations

import dataclasses
import signal
import threading
from typing import Annotated, Any

import anyio
import typer
from rich.console import Console
from rich.table import Table

from herald.cli_common import (
    BrokerOpt,
    JsonOpt,
    err,
    message_json,
    need_broker,
    print_json,
    run,
    stdout_closed,
)
from herald.message import OCCURRED_AT, Message
from herald.transports import open_transport

__all__ = ["groups", "tail", "topics"]

_PREVIEW = 200  # characters of a payload shown on a tail line


def tail(
    topic: Annotated[str, typer.Argument(help="The topic to watch.")],
    broker: BrokerOpt = None,
    last: Annotated[
        int,
        typer.Option(
            min=0,
            help="First print the N newest messages the broker still holds "
            "(not on RabbitMQ or MQTT, which keep no history).",
        ),
    ] = 0,
    count: Annotated[
        int | None, typer.Option(min=1, help="Stop after printing this many messages.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
) -> None:
    """Print messages of a topic as they arrive, without joining or changing any group.

    Nothing is left behind: the broker forgets the tail's private queue, consumer or session
    when it stops (Ctrl-C, SIGTERM, --count). Redeliveries are not shown, only what is
    published to the topic.
    """
    url = need_broker(broker)

    async def follow() -> None:
        shown = 0
        async with open_transport(url) as transport, anyio.create_task_group() as tg:
            tg.start_soon(_stop_on_signal, tg.cancel_scope)
            async with transport.peek(topic, last=last) as messages:
                err.print(f"tailing {topic} on {transport.url} (Ctrl-C to stop)", highlight=False)
                out = Console(soft_wrap=True, highlight=False)
                async for m in messages:
                    if as_json:
                        print_json(message_json(m))
                    else:
                        out.print(_line(m), markup=False)
                    shown += 1
                    if count is not None and shown >= count:
                        break
            tg.cancel_scope.cancel()

    try:
        run(follow)
    except BrokenPipeError:
        stdout_closed()


async def _stop_on_signal(scope: anyio.CancelScope) -> None:
    """Stop the tail cleanly on SIGINT or SIGTERM (only the main thread can receive them)."""
    if threading.current_thread() is not threading.main_thread():
        return
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            scope.cancel()
            return


def _line(m: Message) -> str:
    try:
        text = m.payload.decode("utf-8").replace("\n", "\\n")
        if len(text) > _PREVIEW:
            text = text[:_PREVIEW] + "…"
    except UnicodeDecodeError:
        text = f"<{len(m.payload)} bytes, not UTF-8>"
    parts = [m.headers.get(OCCURRED_AT, "-"), m.id, m.type or "-"]
    if m.key is not None:
        parts.append(f"key={m.key}")
    return "  ".join([*parts, text])


def topics(broker: BrokerOpt = None, as_json: JsonOpt = False) -> None:
    """List the broker's topics, with how many messages each holds.

    Dead-letter and skipped topics are included, the broker's helper objects (retry topics,
    delay queues) are not. Where the broker can list them: not RabbitMQ over AMQP, not MQTT.
    """
    url = need_broker(broker)

    async def work() -> list[Any]:
        async with open_transport(url) as transport:
            return await transport.list_topics()

    found = run(work)
    if as_json:
        print_json([dataclasses.asdict(t) for t in found])
        return
    table = _table(f"{len(found)} topic(s)", "topic", "messages")
    for t in found:
        table.add_row(t.name, _count(t.messages))
    Console().print(table)


def groups(
    topic: Annotated[str, typer.Argument(help="The topic whose groups to list.")],
    broker: BrokerOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List a topic's groups, with their lag.

    lag: messages not handed to the group yet (on Kafka: not acked yet); pending: handed out,
    not acked; consumers: members connected now; "-" where the broker cannot tell it cheaply.
    Where the broker can list them: not RabbitMQ over AMQP, not MQTT.
    """
    url = need_broker(broker)

    async def work() -> list[Any]:
        async with open_transport(url) as transport:
            return await transport.list_groups(topic)

    found = run(work)
    if as_json:
        print_json([dataclasses.asdict(g) for g in found])
        return
    table = _table(f"{len(found)} group(s) on {topic}", "group", "lag", "pending", "consumers")
    for g in found:
        table.add_row(g.name, _count(g.lag), _count(g.pending), _count(g.consumers))
    Console().print(table)


def _table(title: str, first: str, *counts: str) -> Table:
    """A table whose first column (a name to copy) never wraps or shortens."""
    table = Table(title=title)
    table.add_column(first, no_wrap=True, overflow="ignore")
    for name in counts:
        table.add_column(name, justify="right", no_wrap=True)
    return table


def _count(n: int | None) -> str:
    return "-" if n is None else f"{n:,}"
