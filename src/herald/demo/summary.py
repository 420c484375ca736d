"""What a run of the demo produced, and the tables that show it."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from rich import box
from rich.columns import Columns
from rich.console import Console
from rich.table import Table

from herald.demo.events import Outcome
from herald.demo.timeline import OUTCOME_LABELS, SERVICE_STYLES

__all__ = ["DemoResult", "GroupStats", "print_summary"]


@dataclass(frozen=True, slots=True)
class GroupStats:
    """One consumer group's counters, summed over the topics it subscribes to."""

    group: str
    topics: tuple[str, ...]
    handled: int
    ignored: int  # messages of types the group has no handler for (acked, not handled)
    retries: int
    dead_lettered: int


@dataclass(frozen=True, slots=True)
class DemoResult:
    broker: str
    orders: int
    outcomes: dict[Outcome, int]
    shipped_by_service: dict[str, int]  # express / standard
    revenue: dict[str, Decimal]  # by currency
    paid_orders: dict[str, int]  # by currency
    notifications: dict[str, int]  # by language
    groups: list[GroupStats]
    elapsed: float
    open_orders: dict[str, str]  # order id -> its last step, for orders that never closed
    broken_chains: list[str]  # orders whose events carried more than one correlation id

    @property
    def closed(self) -> int:
        return sum(self.outcomes.values())

    @property
    def dead_letters(self) -> int:
        return sum(g.dead_lettered for g in self.groups)

    @property
    def events_handled(self) -> int:
        return sum(g.handled for g in self.groups)

    @property
    def ok(self) -> bool:
        """Every order reached a final state, nothing was dead-lettered, no chain broke."""
        return (
            self.closed == self.orders
            and not self.open_orders
            and self.dead_letters == 0
            and not self.broken_chains
        )

    @property
    def exit_code(self) -> int:
        return 0 if self.ok else 1


def print_summary(console: Console, r: DemoResult) -> None:
    console.rule("[bold]Summary")
    console.print(Columns([_outcomes(r), _revenue(r), _languages(r)], padding=(0, 2)))
    console.print(_groups(r))
    console.print(
        f"{r.closed} of {r.orders} orders closed in [bold]{r.elapsed:.2f} s[/] on {r.broker}",
        highlight=False,
    )
    console.print(
        f"{r.events_handled} events handled, dead letters: [bold]{r.dead_letters}[/]",
        highlight=False,
    )
    for order_id in r.broken_chains:
        console.print(f"[red]✗ {order_id}: its events carried more than one correlation id")
    if r.ok:
        console.print("[bold green]✓ every order reached a final state and its customer was told")
        return
    if r.open_orders:
        console.print(f"[bold red]✗ {len(r.open_orders)} order(s) never reached a final state:")
        for order_id, step in sorted(r.open_orders.items())[:20]:
            console.print(f"  [red]{order_id}[/]: {step}", highlight=False)
        if len(r.open_orders) > 20:
            console.print(f"  … and {len(r.open_orders) - 20} more")
    if r.dead_letters:
        console.print(f"[bold red]✗ {r.dead_letters} message(s) went to the dead letters")


def _outcomes(r: DemoResult) -> Table:
    t = Table(title="Final states", title_style="bold", box=box.SIMPLE_HEAD)
    t.add_column("state")
    t.add_column("orders", justify="right")
    styles: dict[Outcome, str] = {
        "shipped": "green",
        "out_of_stock": "yellow",
        "payment_declined": "red",
    }
    for outcome, label in OUTCOME_LABELS.items():
        t.add_row(f"[{styles[outcome]}]{label}", str(r.outcomes.get(outcome, 0)))
        if outcome == "shipped":
            for service, n in sorted(r.shipped_by_service.items()):
                t.add_row(f"[dim]  {service}", f"[dim]{n}")
    if r.open_orders:
        t.add_row("[bold red]still open", str(len(r.open_orders)))
    t.add_section()
    t.add_row("[bold]total", f"[bold]{r.orders}")
    return t


def _revenue(r: DemoResult) -> Table:
    t = Table(title="Revenue captured", title_style="bold", box=box.SIMPLE_HEAD)
    t.add_column("currency")
    t.add_column("paid orders", justify="right")
    t.add_column("revenue", justify="right")
    for currency in sorted(r.revenue):
        t.add_row(currency, str(r.paid_orders[currency]), f"{r.revenue[currency]:,}")
    return t


def _languages(r: DemoResult) -> Table:
    t = Table(title="Customers notified", title_style="bold", box=box.SIMPLE_HEAD)
    t.add_column("language")
    t.add_column("messages", justify="right")
    for language, n in sorted(r.notifications.items(), key=lambda kv: (-kv[1], kv[0])):
        t.add_row(language, str(n))
    t.add_section()
    t.add_row("[bold]total", f"[bold]{sum(r.notifications.values())}")
    return t


def _groups(r: DemoResult) -> Table:
    t = Table(
        title="Consumer groups",
        title_style="bold",
        box=box.SIMPLE_HEAD,
        caption="ignored: event types the group has no handler for (acked, not handled)",
    )
    t.add_column("group")
    t.add_column("topics")
    t.add_column("handled", justify="right")
    t.add_column("ignored", justify="right")
    t.add_column("retries", justify="right")
    t.add_column("dead letters", justify="right")
    for g in r.groups:
        style = SERVICE_STYLES.get(g.group, "")
        dead = f"[bold red]{g.dead_lettered}" if g.dead_lettered else "0"
        t.add_row(
            f"[{style}]{g.group}",
            ", ".join(sorted(g.topics)),
            str(g.handled),
            str(g.ignored),
            str(g.retries),
            dead,
        )
    return t
