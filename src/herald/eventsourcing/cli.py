"""``herald projections``: the status of an app's projections, and rebuilding one.

::

    herald projections status --app examples.bank_account:app
    herald projections rebuild balances --app examples.bank_account:app

The app is imported (not started): its projections are found on it, and their store and read
model opened just for the command.
"""

from __future__ import annotations

from typing import Annotated

import anyio
import typer
from rich.console import Console
from rich.table import Table

from herald.eventsourcing.projection import Projection, projections_of
from herald.loading import load_app
from herald.transports import TransportError

__all__ = ["projections_cli"]

projections_cli = typer.Typer(
    help="Projections (read models): status and lag, rebuild.", no_args_is_help=True
)
err = Console(stderr=True)
AppOpt = Annotated[
    str, typer.Option("--app", help="The app, as MODULE:ATTRIBUTE.", envvar="HERALD_APP")
]


def _fail(message: str, code: int = 2) -> typer.Exit:
    err.print(f"[bold red]error:[/] {message}", highlight=False)
    return typer.Exit(code)


def _projections(target: str) -> dict[str, Projection]:
    try:
        app = load_app(target)
    except (ImportError, ValueError) as e:
        raise _fail(str(e)) from e
    found = projections_of(app)
    if not found:
        raise _fail(f"{target} has no projections")
    return found


@projections_cli.command("status")
def status(app: AppOpt) -> None:
    """Show each projection's position, the store's head and the lag (events not applied)."""
    projections = _projections(app)

    async def go() -> list[tuple[str, int, int, int]]:
        rows = []
        for p in projections.values():
            async with p:
                s = await p.status()
            rows.append((s.name, s.position, s.head, s.lag))
        return rows

    try:
        rows = anyio.run(go)
    except TransportError as e:
        raise _fail(str(e), 1) from e
    table = Table(title=f"projections of {app}")
    for col in ("projection", "position", "head", "lag"):
        table.add_column(col)
    for name, pos, head, lag in rows:
        table.add_row(name, str(pos), str(head), str(lag))
    Console().print(table)


@projections_cli.command("rebuild")
def rebuild(
    name: Annotated[str, typer.Argument(help="The projection to rebuild.")], app: AppOpt
) -> None:
    """Replay every stored event into a fresh read model and switch over atomically."""
    projections = _projections(app)
    p = projections.get(name)
    if p is None:
        raise _fail(f"no projection {name!r}; {app} has: {', '.join(sorted(projections))}")

    async def go() -> int:
        async with p:
            return await p.rebuild()

    try:
        n = anyio.run(go)
    except TransportError as e:
        raise _fail(str(e), 1) from e
    Console().print(f"rebuilt {name}: {n} events replayed")
