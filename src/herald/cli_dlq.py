"""``herald dlq list|show|replay|purge``: the dead-letter tooling (:mod:`herald.dlq`) on the
command line.

Only dead-letter (``<topic>.<group>.dlq``) and skipped (``<topic>.<group>.skipped``) topics
are accepted; ``herald tail`` watches any other topic. ``list`` and ``show`` change nothing;
``--json`` prints the letters for scripts. The broker rule is in :mod:`herald.cli_common`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table

from herald.cli_common import (
    BrokerOpt,
    JsonOpt,
    err,
    fail,
    message_json,
    name_values,
    need_broker,
    print_json,
    run,
)
from herald.dlq import DeadLetters, origin
from herald.message import Message

__all__ = ["dlq_cli"]

T = TypeVar("T")

dlq_cli = typer.Typer(help="Inspect, replay and purge dead letters.", no_args_is_help=True)

DlqTopic = Annotated[
    str,
    typer.Argument(
        help="The dead-letter topic, e.g. orders.billing.dlq (or a skipped topic, "
        "orders.billing.skipped)."
    ),
]
LimitOpt = Annotated[int | None, typer.Option(min=1, help="At most this many.")]
MatchOpt = Annotated[
    list[str] | None,
    typer.Option("--match", help="Only letters whose header NAME equals VALUE (NAME=VALUE)."),
]
TypeOpt = Annotated[str | None, typer.Option("--type", help="Only letters of this event type.")]


def _where(match: list[str] | None, type_: str | None) -> Callable[[Message], bool] | None:
    wanted = name_values("--match", match)
    if not wanted and type_ is None:
        return None

    def where(m: Message) -> bool:
        if type_ is not None and m.type != type_:
            return False
        return all(m.headers.get(k) == v for k, v in wanted.items())

    return where


def _with_dlq(broker: str | None, topic: str, work: Callable[[DeadLetters], Awaitable[T]]) -> T:
    url = need_broker(broker)

    async def go() -> T:
        async with DeadLetters(url, topic) as dlq:
            return await work(dlq)

    return run(go)


@dlq_cli.command("list")
def dlq_list(
    topic: DlqTopic,
    broker: BrokerOpt = None,
    limit: Annotated[int, typer.Option(min=1, help="At most this many.")] = 50,
    match: MatchOpt = None,
    type: TypeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List dead letters, oldest first (changes nothing). Ids are shown whole, for `dlq show`."""
    where = _where(match, type)
    letters = _with_dlq(broker, topic, lambda d: d.list(limit, where))
    if as_json:
        print_json([message_json(m) for m in letters])
        return
    ids = [origin(m)[0] for m in letters]
    table = Table(title=f"{len(letters)} dead letter(s) on {topic}")
    # the id is what `dlq show` takes: never wrapped or shortened, whatever the width
    table.add_column("original id", no_wrap=True, min_width=max(map(len, ids), default=11))
    for col in ("type", "reason", "error", "attempts", "last failure"):
        table.add_column(col, overflow="fold")
    for m, original_id in zip(letters, ids, strict=True):
        h = m.headers
        short_type = h.get("dlq.error_type", "").rsplit(".", 1)[-1]
        error = f"{short_type}: {h.get('dlq.error', '')}".strip(": ")
        reason = h.get("dlq.reason") or ("skipped" if "skipped.group" in h else "")
        table.add_row(
            original_id,
            m.type or "",
            reason,
            error[:80],
            h.get("dlq.attempts", ""),
            h.get("dlq.last_failure_at", ""),
        )
    Console().print(table)


@dlq_cli.command("show")
def dlq_show(
    topic: DlqTopic,
    message_id: Annotated[str, typer.Argument(help="The dead letter's id or its original id.")],
    broker: BrokerOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show one dead letter: headers (with the traceback) and payload (changes nothing)."""
    m = _with_dlq(broker, topic, lambda d: d.show(message_id))
    if m is None:
        raise fail(f"no dead letter {message_id!r} on {topic}", 1)
    if as_json:
        print_json(message_json(m))
        return
    out = Console()
    out.print(f"[bold]id[/] {m.id}  [bold]type[/] {m.type}  [bold]key[/] {m.key}", soft_wrap=True)
    for k, v in sorted(m.headers.items()):
        if k != "dlq.traceback":
            out.print(f"[cyan]{k}[/] {v}", highlight=False, soft_wrap=True)
    if "dlq.traceback" in m.headers:
        out.print("[bold]traceback[/]")
        out.print(m.headers["dlq.traceback"], highlight=False, markup=False)
    out.print("[bold]payload[/]")
    try:
        out.print(m.payload.decode("utf-8"), highlight=False, markup=False)
    except UnicodeDecodeError:
        out.print(f"<{len(m.payload)} bytes, not UTF-8> {m.payload[:64]!r}", markup=False)


def _bulk(
    verb: str,
    broker: str | None,
    topic: str,
    limit: int | None,
    where: Callable[[Message], bool] | None,
) -> None:
    columns = (TextColumn(f"{verb} [bold]{topic}[/]"), BarColumn(), MofNCompleteColumn())
    with Progress(*columns, console=err, transient=True) as progress:
        task = progress.add_task(verb, total=limit)

        def advance(done: int) -> None:
            progress.update(task, completed=done)

        async def work(dlq: DeadLetters) -> int:
            action = dlq.replay if verb == "replaying" else dlq.purge
            return await action(limit, where, advance)

        n = _with_dlq(broker, topic, work)
    Console().print(f"{'replayed' if verb == 'replaying' else 'purged'} {n} dead letter(s)")


@dlq_cli.command("replay")
def dlq_replay(
    topic: DlqTopic,
    broker: BrokerOpt = None,
    limit: LimitOpt = None,
    match: MatchOpt = None,
    type: TypeOpt = None,
) -> None:
    """Publish dead letters back to their original topic, for the group that failed them."""
    _bulk("replaying", broker, topic, limit, _where(match, type))


@dlq_cli.command("purge")
def dlq_purge(
    topic: DlqTopic,
    broker: BrokerOpt = None,
    limit: LimitOpt = None,
    match: MatchOpt = None,
    type: TypeOpt = None,
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
) -> None:
    """Delete dead letters for good."""
    try:
        DeadLetters(need_broker(broker), topic)  # refuse a wrong topic before asking
    except (ValueError, ImportError) as e:
        raise fail(str(e)) from e
    if not yes and not typer.confirm(f"Purge dead letters from {topic}?"):
        raise typer.Exit(1)
    _bulk("purging", broker, topic, limit, _where(match, type))
