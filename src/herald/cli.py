"""The ``herald`` command line: run workers, publish, demo, benchmark."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar

import anyio
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from herald.dlq import DeadLetters
from herald.lifecycle import StartAborted, stop_signals_abort_start
from herald.loading import load_app
from herald.message import (
    CONTENT_TYPE,
    CORRELATION_ID,
    OCCURRED_AT,
    SOURCE,
    Message,
    new_id,
    utc_now_rfc3339,
)
from herald.transports import TransportError, open_transport, redact_url

__all__ = ["cli", "main"]

cli = typer.Typer(
    name="herald",
    help="Typed event-driven messaging: run workers, publish events, demo, benchmark.",
    no_args_is_help=True,
    add_completion=False,
)
err = Console(stderr=True)

BENCH_TRANSPORTS = ("memory", "sqlite", "redis", "rabbitmq", "kafka", "nats", "mqtt")
T = TypeVar("T")


def _fail(message: str, code: int = 2) -> typer.Exit:
    err.print(f"[bold red]error:[/] {message}", highlight=False)
    return typer.Exit(code)


@cli.command()
def run(
    target: Annotated[str, typer.Argument(help="The app to run, as MODULE:ATTRIBUTE.")],
    concurrency: Annotated[
        int | None, typer.Option(min=1, help="Handle this many deliveries at once per group.")
    ] = None,
    log_level: Annotated[str, typer.Option(help="Logging level.")] = "INFO",
) -> None:
    """Run an app's consumers until SIGINT/SIGTERM, then shut down gracefully."""
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        with stop_signals_abort_start():  # until app.run() handles them itself
            try:
                app = load_app(target)
            except (ImportError, ValueError) as e:
                raise _fail(str(e)) from e
            if concurrency is not None:
                app.set_concurrency(concurrency)
            try:
                app.run()
            except TransportError as e:
                raise _fail(str(e), 1) from e
    except StartAborted as e:
        logging.getLogger("herald").info("%s: %s; stopped", target, e)


@cli.command()
def publish(
    topic: Annotated[str, typer.Argument(help="Topic to publish to.")],
    payload: Annotated[str, typer.Argument(help="The event as JSON.")],
    broker: Annotated[str, typer.Option(help="Broker URL.", envvar="HERALD_BROKER")] = (
        "sqlite:///herald.db"
    ),
    key: Annotated[str | None, typer.Option(help="Ordering/partition key.")] = None,
    type: Annotated[str | None, typer.Option("--type", help="Event type name.")] = None,
    header: Annotated[
        list[str] | None, typer.Option(help="Extra header NAME=VALUE (repeatable).")
    ] = None,
) -> None:
    """Publish one JSON event and print its message id."""
    try:
        json.loads(payload)
    except json.JSONDecodeError as e:
        raise _fail(f"payload is not valid JSON: {e}") from e
    headers: dict[str, str] = {}
    for h in header or []:
        name, sep, value = h.partition("=")
        if not sep or not name:
            raise _fail(f"--header takes NAME=VALUE, got {h!r}")
        headers[name] = value
    mid = new_id()
    msg = Message(
        id=mid,
        topic=topic,
        payload=payload.encode(),
        key=key,
        type=type,
        headers={
            CORRELATION_ID: mid,
            OCCURRED_AT: utc_now_rfc3339(),
            SOURCE: "herald-cli",
            CONTENT_TYPE: "application/json",
            **headers,
        },
    )

    async def send() -> None:
        async with open_transport(broker) as transport:
            await transport.publish(topic, [msg])

    try:
        anyio.run(send)
    except (ValueError, ImportError) as e:
        raise _fail(str(e)) from e
    except TransportError as e:
        raise _fail(str(e), 1) from e
    print(mid)


@cli.command()
def demo(
    broker: Annotated[
        str | None, typer.Option(help="Broker URL (default: a fresh SQLite file).")
    ] = None,
    orders: Annotated[int, typer.Option(min=1, help="How many orders to place.")] = 100,
    seed: Annotated[int, typer.Option(help="Random seed for the order mix.")] = 7,
) -> None:
    """Run the international order-flow demo on the embedded broker."""
    from herald.demo import run_demo

    raise typer.Exit(run_demo(broker, orders=orders, seed=seed))


@cli.command()
def bench(
    transport: Annotated[str, typer.Argument(help=f"One of: {', '.join(BENCH_TRANSPORTS)}.")],
    broker: Annotated[str | None, typer.Option(help="Broker URL (default per transport).")] = None,
    n: Annotated[int, typer.Option("--n", min=1, help="Number of events.")] = 200_000,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Measure end-to-end throughput (publish, consume, ack) with one trivial handler."""
    from herald.bench import SCHEMES, default_url, run_bench

    if transport not in BENCH_TRANSPORTS:
        raise _fail(f"unknown transport {transport!r}; choose from {', '.join(BENCH_TRANSPORTS)}")
    url = broker or default_url(transport)
    if url.split("://", 1)[0].lower() not in SCHEMES[transport]:
        schemes = " or ".join(f"{s}://" for s in SCHEMES[transport])
        raise _fail(f"--broker {redact_url(url)!r} is not a {schemes} URL")
    columns = (
        TextColumn(f"[bold]{transport}[/]"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    # No refresh thread: it competes with the benchmark for the GIL (~15% on memory://).
    # The callback repaints at most twice a second instead.
    with Progress(*columns, console=err, transient=as_json, auto_refresh=False) as progress:
        task = progress.add_task("handled", total=n)
        painted = 0.0

        def advance(handled: int) -> None:
            nonlocal painted
            now = time.monotonic()
            if now - painted >= 0.5 or handled >= n:
                painted = now
                progress.update(task, completed=handled, refresh=True)

        try:
            result = anyio.run(lambda: run_bench(url, n, progress=advance))
        except (ValueError, ImportError) as e:
            raise _fail(str(e)) from e
        except TransportError as e:
            raise _fail(str(e), 1) from e
    figures: dict[str, Any] = {
        "transport": transport,
        "broker": result.url,
        "n": result.n,
        "seconds": round(result.seconds, 4),
        "msgs_per_s": round(result.msgs_per_s, 1),
    }
    if as_json:
        print(json.dumps(figures))
    else:
        Console().print(
            f"[bold]{transport}[/]: {result.msgs_per_s:,.0f} msgs/s end-to-end with ack "
            f"({result.n:,} events in {result.seconds:.2f} s, {result.url})"
        )


# --- dead letters --------------------------------------------------------------------------

dlq_cli = typer.Typer(help="Inspect, replay and purge dead letters.", no_args_is_help=True)
cli.add_typer(dlq_cli, name="dlq")

BrokerOpt = Annotated[str, typer.Option(help="Broker URL.", envvar="HERALD_BROKER")]
DlqTopic = Annotated[str, typer.Argument(help="The dead-letter topic, e.g. orders.billing.dlq.")]
LimitOpt = Annotated[int | None, typer.Option(min=1, help="At most this many.")]
MatchOpt = Annotated[
    list[str] | None,
    typer.Option("--match", help="Only letters whose header NAME equals VALUE (NAME=VALUE)."),
]
TypeOpt = Annotated[str | None, typer.Option("--type", help="Only letters of this event type.")]


def _where(match: list[str] | None, type_: str | None) -> Callable[[Message], bool] | None:
    wanted: dict[str, str] = {}
    for item in match or []:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise _fail(f"--match takes NAME=VALUE, got {item!r}")
        wanted[name] = value
    if not wanted and type_ is None:
        return None

    def where(m: Message) -> bool:
        if type_ is not None and m.type != type_:
            return False
        return all(m.headers.get(k) == v for k, v in wanted.items())

    return where


def _run_dlq(broker: str, topic: str, work: Callable[[DeadLetters], Awaitable[T]]) -> T:
    async def go() -> T:
        async with DeadLetters(broker, topic) as dlq:
            return await work(dlq)

    try:
        return anyio.run(go)
    except (ValueError, ImportError) as e:
        raise _fail(str(e)) from e
    except TransportError as e:
        raise _fail(str(e), 1) from e


@dlq_cli.command("list")
def dlq_list(
    topic: DlqTopic,
    broker: BrokerOpt = "sqlite:///herald.db",
    limit: Annotated[int, typer.Option(min=1, help="At most this many.")] = 50,
    match: MatchOpt = None,
    type: TypeOpt = None,
) -> None:
    """List dead letters, oldest first (changes nothing)."""
    where = _where(match, type)
    letters = _run_dlq(broker, topic, lambda d: d.list(limit, where))
    table = Table(title=f"{len(letters)} dead letter(s) on {topic}", show_lines=False)
    for col in ("original id", "type", "reason", "error", "attempts", "last failure"):
        table.add_column(col, overflow="fold")
    for m in letters:
        h = m.headers
        short_type = h.get("dlq.error_type", "").rsplit(".", 1)[-1]
        error = f"{short_type}: {h.get('dlq.error', '')}".strip(": ")
        table.add_row(
            h.get("dlq.original_id", m.id),
            m.type or "",
            h.get("dlq.reason", ""),
            error[:80],
            h.get("dlq.attempts", ""),
            h.get("dlq.last_failure_at", ""),
        )
    Console().print(table)


@dlq_cli.command("show")
def dlq_show(
    topic: DlqTopic,
    message_id: Annotated[str, typer.Argument(help="The dead letter's id or its original id.")],
    broker: BrokerOpt = "sqlite:///herald.db",
) -> None:
    """Show one dead letter: headers (with the traceback) and payload."""
    m = _run_dlq(broker, topic, lambda d: d.show(message_id))
    if m is None:
        raise _fail(f"no dead letter {message_id!r} on {topic}", 1)
    out = Console()
    out.print(f"[bold]id[/] {m.id}  [bold]type[/] {m.type}  [bold]key[/] {m.key}")
    for k, v in sorted(m.headers.items()):
        if k != "dlq.traceback":
            out.print(f"[cyan]{k}[/] {v}", highlight=False)
    if "dlq.traceback" in m.headers:
        out.print("[bold]traceback[/]")
        out.print(m.headers["dlq.traceback"], highlight=False, markup=False)
    out.print("[bold]payload[/]")
    try:
        out.print(m.payload.decode("utf-8"), highlight=False, markup=False)
    except UnicodeDecodeError:
        out.print(f"<{len(m.payload)} bytes, not UTF-8> {m.payload[:64]!r}", markup=False)


def _bulk(
    verb: str, broker: str, topic: str, limit: int | None, where: Callable[[Message], bool] | None
) -> None:
    columns = (TextColumn(f"{verb} [bold]{topic}[/]"), BarColumn(), MofNCompleteColumn())
    with Progress(*columns, console=err, transient=True) as progress:
        task = progress.add_task(verb, total=limit)

        def advance(done: int) -> None:
            progress.update(task, completed=done)

        async def work(dlq: DeadLetters) -> int:
            action = dlq.replay if verb == "replaying" else dlq.purge
            return await action(limit, where, advance)

        n = _run_dlq(broker, topic, work)
    Console().print(f"{'replayed' if verb == 'replaying' else 'purged'} {n} dead letter(s)")


@dlq_cli.command("replay")
def dlq_replay(
    topic: DlqTopic,
    broker: BrokerOpt = "sqlite:///herald.db",
    limit: LimitOpt = None,
    match: MatchOpt = None,
    type: TypeOpt = None,
) -> None:
    """Publish dead letters back to their original topic, for the group that failed them."""
    _bulk("replaying", broker, topic, limit, _where(match, type))


@dlq_cli.command("purge")
def dlq_purge(
    topic: DlqTopic,
    broker: BrokerOpt = "sqlite:///herald.db",
    limit: LimitOpt = None,
    match: MatchOpt = None,
    type: TypeOpt = None,
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
) -> None:
    """Delete dead letters for good."""
    if not yes and not typer.confirm(f"Purge dead letters from {topic}?"):
        raise typer.Exit(1)
    _bulk("purging", broker, topic, limit, _where(match, type))


from herald.eventsourcing.cli import projections_cli  # noqa: E402  (the CLI is the top layer)

cli.add_typer(projections_cli, name="projections")


def main() -> None:
    cli()
