"""The live view: every step of every order is recorded; a few are shown, the rest is a bar.

Showing all ~600 steps of 100 orders would bury the story, so the timeline prints:

- every step of the first few orders as it happens (their lines interleave, as in real life);
- the whole causal chain of the first order that ends in each other outcome (a sold-out item,
  a declined card), once that order is closed;
- a progress bar with the running counts for everything else.

Each line: seconds since start, the correlation id (its last digits), the service, the event it
published, and details. The correlation id is what ties the lines of one order together.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.text import Text

from herald.demo.events import Outcome

__all__ = ["SERVICE_STYLES", "Entry", "Timeline"]

SERVICE_STYLES: dict[str, str] = {
    "orders": "bright_blue",
    "inventory": "yellow",
    "payments": "green",
    "shipping": "magenta",
    "notifications": "cyan",
}

OUTCOME_LABELS: dict[Outcome, str] = {
    "shipped": "shipped",
    "out_of_stock": "out of stock",
    "payment_declined": "payment declined",
}


class Event(Protocol):
    @property
    def order_id(self) -> str: ...


@dataclass(frozen=True, slots=True)
class Entry:
    """One step of one order: a service published an event."""

    at: float  # seconds since the timeline started
    correlation_id: str
    service: str
    event: str
    order_id: str
    detail: str
    bad: bool = False  # an unhappy turn, shown in red


class Timeline:
    """Records what every service did, per order, and shows it as described above."""

    def __init__(self, console: Console, *, total: int, live_orders: Collection[str]) -> None:
        self.console = console
        self.total = total
        self._live = set(live_orders)
        self._start = time.perf_counter()
        self._entries: dict[str, list[Entry]] = defaultdict(list)
        self._outcomes: Counter[Outcome] = Counter()
        self._spotlit: set[Outcome] = set()
        self._bar: tuple[Progress, TaskID] | None = None

    # --- recording --------------------------------------------------------------------------

    def record(
        self, correlation_id: str, service: str, event: Event, detail: str, *, bad: bool = False
    ) -> None:
        """``service`` published ``event`` for the order that ``correlation_id`` began."""
        self._add(correlation_id, service, type(event).__name__, event.order_id, detail, bad)

    def order_closed(self, correlation_id: str, order_id: str, outcome: Outcome) -> None:
        """The Orders service closed ``order_id``: the last step of its chain."""
        if any(e.event == "OrderClosed" for e in self._entries[order_id]):
            return  # a redelivered notification: the order is closed already
        label = OUTCOME_LABELS[outcome]
        detail = f"{order_id} {label}"
        self._add(correlation_id, "orders", "OrderClosed", order_id, detail, outcome != "shipped")
        self._outcomes[outcome] += 1
        if order_id in self._live:
            self._spotlit.add(outcome)
        elif outcome not in self._spotlit:
            self._spotlit.add(outcome)
            self._print_chain(order_id, f"the first order that ended: {label}")
        if self._bar is not None:
            progress, task = self._bar
            progress.update(task, advance=1, counts=self._counts())

    def _add(
        self, correlation_id: str, service: str, event: str, order_id: str, detail: str, bad: bool
    ) -> None:
        entry = Entry(
            time.perf_counter() - self._start, correlation_id, service, event, order_id, detail, bad
        )
        self._entries[order_id].append(entry)
        if order_id in self._live:
            self.console.print(self._line(entry), no_wrap=True, overflow="ellipsis")

    # --- reading ----------------------------------------------------------------------------

    def correlation_ids(self, order_id: str) -> set[str]:
        return {e.correlation_id for e in self._entries.get(order_id, ())}

    def last_step(self, order_id: str) -> str:
        entries = self._entries.get(order_id)
        if not entries:
            return "never placed"
        return f"last step: {entries[-1].service} {entries[-1].event}"

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self._start

    # --- showing ----------------------------------------------------------------------------

    @contextmanager
    def live(self) -> Iterator[None]:
        """Show the progress bar while the block runs (printed lines go above it).

        The clock starts here, once the services are up.
        """
        self._start = time.perf_counter()
        self.console.rule("[bold]Herald demo: the international order flow")
        self._header()
        progress = Progress(
            TextColumn("[bold]orders"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[counts]}"),
            TimeElapsedColumn(),
            console=self.console,
        )
        task = progress.add_task("orders", total=self.total, counts=self._counts())
        self._bar = progress, task
        try:
            with progress:
                yield
        finally:
            self._bar = None

    def _header(self) -> None:
        self.console.print(
            Text.assemble(
                ("   time  corr.    service        event             details", "bold"),
            ),
            no_wrap=True,
        )

    def _line(self, e: Entry) -> Text:
        style = SERVICE_STYLES.get(e.service, "white")
        return Text.assemble(
            (f"{e.at:6.3f}s  ", "dim"),
            (f"…{e.correlation_id[-6:]}  ", "dim"),
            (f"{e.service:<14} ", style),
            (f"{e.event:<17} ", f"bold {style}"),
            (e.detail, "red" if e.bad else ""),
        )

    def _print_chain(self, order_id: str, why: str) -> None:
        self.console.print(Text(f"  ▸ {order_id}, {why}:", style="bold"))
        for entry in self._entries[order_id]:
            self.console.print(self._line(entry), no_wrap=True, overflow="ellipsis")

    def _counts(self) -> str:
        o = self._outcomes
        return (
            f"[green]{o['shipped']} shipped[/]  [yellow]{o['out_of_stock']} out of stock[/]  "
            f"[red]{o['payment_declined']} declined[/]"
        )
