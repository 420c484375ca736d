"""The ``herald`` command line: run workers, publish, tail, list, demo, benchmark, dead letters.

The sub-commands live in ``cli_inspect`` (tail, topics, groups) and ``cli_dlq`` (dlq ...);
what they share, and the rule for ``--broker``, in ``cli_common``.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Annotated, Any

import anyio
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

import herald
from herald.cli_common import BROKER_ENV, BrokerOpt, err, fail, name_values, need_broker
from herald.cli_dlq import dlq_cli
from herald.cli_inspect import groups, tail, topics
from herald.eventsourcing.cli import projections_cli
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
    help=(
        "Typed event-driven messaging: run workers, publish events, watch topics, handle dead "
        f"letters, demo, benchmark. Commands that read or write your messages need --broker "
        f"URL or ${BROKER_ENV}."
    ),
    no_args_is_help=True,
    add_completion=False,
)

BENCH_TRANSPORTS = ("memory", "sqlite", "redis", "rabbitmq", "kafka", "nats", "mqtt")

_fail = fail  # the name the commands below use


def _print_version(value: bool) -> None:
    if value:
        print(f"herald {herald.__version__}")
        raise typer.Exit()


@cli.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print the version, exit."
        ),
    ] = False,
) -> None:
    pass


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
    broker: BrokerOpt = None,
    key: Annotated[str | None, typer.Option(help="Ordering/partition key.")] = None,
    type: Annotated[str | None, typer.Option("--type", help="Event type name.")] = None,
    header: Annotated[
        list[str] | None, typer.Option(help="Extra header NAME=VALUE (repeatable).")
    ] = None,
) -> None:
    """Publish one JSON event and print its message id."""
    url = need_broker(broker)
    try:
        json.loads(payload)
    except json.JSONDecodeError as e:
        raise _fail(f"payload is not valid JSON: {e}") from e
    headers = name_values("--header", header)
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
        async with open_transport(url) as transport:
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
        str | None,
        typer.Option(
            metavar="URL",
            help=f"Broker URL. Default: a fresh SQLite file, deleted afterwards (the demo makes "
            f"its own data, so it does not read ${BROKER_ENV}).",
        ),
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
    broker: Annotated[
        str | None,
        typer.Option(
            metavar="URL",
            help=f"Broker URL. Default: the local server of TRANSPORT, or a fresh file or bus "
            f"(the benchmark makes its own topics, so it does not read ${BROKER_ENV}).",
        ),
    ] = None,
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


# --- sub-commands ----------------------------------------------------------------------------

cli.add_typer(dlq_cli, name="dlq")
cli.add_typer(projections_cli, name="projections")
cli.command()(tail)
cli.command()(topics)
cli.command()(groups)


def main() -> None:
    """The ``herald`` console script (also ``python -m herald``)."""
    cli(prog_name="herald")
