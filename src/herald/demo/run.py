"""Run the demo: open the shop, take the orders, wait until every one is closed, sum up.

:func:`run_demo` is what ``herald demo`` and ``python -m herald.demo`` call; :func:`play` is
its async body and returns a :class:`~herald.demo.summary.DemoResult` for tests to check.
"""

from __future__ import annotations

import tempfile
from collections import Counter, defaultdict
from functools import partial
from pathlib import Path

import anyio
from rich.console import Console

from herald import TransportError
from herald.consumer import GroupConsumer
from herald.demo.catalog import generate_orders
from herald.demo.events import Outcome, PaymentCaptured
from herald.demo.services import OrderBook, Shop, build_app, checkout
from herald.demo.summary import DemoResult, GroupStats, print_summary
from herald.demo.timeline import Timeline

__all__ = ["play", "run_demo"]

#: orders whose every step is printed as it happens
LIVE_ORDERS = 3
#: seconds between two customers checking out, so the flow unfolds at a watchable pace
ARRIVAL_INTERVAL = 0.01


def run_demo(
    broker_url: str | None = None,
    orders: int = 100,
    seed: int = 7,
    console: Console | None = None,
    timeout: float = 60.0,
    arrival_interval: float = ARRIVAL_INTERVAL,
) -> int:
    """Run the order flow and print it; return 0 only if every order reached a final state.

    :param broker_url: where the services talk; default: a fresh SQLite file in a temporary
        directory, removed afterwards.
    :param orders: how many orders customers place.
    :param seed: the same seed tells the same story (orders, sold-out items, declined cards).
    :param timeout: seconds to wait for every order to close before giving up.
    :param arrival_interval: seconds between two orders (0: all at once).

    A broker URL that is wrong or a broker that cannot be reached is reported in one line,
    with exit code 2.
    """
    if orders < 1:
        raise ValueError("orders must be at least 1")
    console = console or Console()
    with tempfile.TemporaryDirectory(prefix="herald-demo-") as tmp:
        url = broker_url or f"sqlite:///{Path(tmp) / 'demo.db'}"
        body = partial(
            play,
            url,
            orders=orders,
            seed=seed,
            console=console,
            timeout=timeout,
            arrival_interval=arrival_interval,
        )
        try:
            result = anyio.run(body)
        except (TransportError, ValueError, ImportError) as e:
            console.print(f"[bold red]herald demo: {e}", highlight=False)
            return 2
    print_summary(console, result)
    return result.exit_code


async def play(
    broker_url: str,
    *,
    orders: int = 100,
    seed: int = 7,
    console: Console | None = None,
    timeout: float = 60.0,
    arrival_interval: float = ARRIVAL_INTERVAL,
) -> DemoResult:
    """Run the five services on ``broker_url``, place ``orders`` orders, wait for them all."""
    console = console or Console()
    placed = generate_orders(orders, seed)
    live = [o.order_id for o in placed[:LIVE_ORDERS]]
    timeline = Timeline(console, total=len(placed), live_orders=live)
    shop = Shop(OrderBook(expected=frozenset(o.order_id for o in placed)))
    app = build_app(broker_url, shop, timeline)
    async with app:
        consumers = app.consumers  # kept: their stats are final once the app stops
        with timeline.live(), anyio.move_on_after(timeout):
            for order in placed:
                await checkout(app, shop, timeline, order)
                await anyio.sleep(arrival_interval)
            await shop.orders.all_closed.wait()
        elapsed = timeline.elapsed
    return _result(broker_url, shop, timeline, consumers, elapsed)


def _result(
    broker: str, shop: Shop, timeline: Timeline, consumers: list[GroupConsumer], elapsed: float
) -> DemoResult:
    book = shop.orders
    outcomes: Counter[Outcome] = Counter(book.closed.values())
    paid = [p for p in shop.payments.decided.values() if isinstance(p, PaymentCaptured)]
    return DemoResult(
        broker=broker,
        orders=len(book.expected),
        outcomes=dict(outcomes),
        shipped_by_service=dict(shop.shipping.by_service),
        revenue=dict(shop.payments.revenue),
        paid_orders=dict(Counter(p.currency for p in paid)),
        notifications=dict(shop.notifications.by_language),
        groups=_group_stats(consumers),
        elapsed=elapsed,
        open_orders={o: timeline.last_step(o) for o in book.open_orders},
        broken_chains=[o for o in book.placed if len(timeline.correlation_ids(o)) != 1],
    )


def _group_stats(consumers: list[GroupConsumer]) -> list[GroupStats]:
    by_group: dict[str, list[GroupConsumer]] = defaultdict(list)
    for c in consumers:
        by_group[c.spec.group].append(c)
    return [
        GroupStats(
            group=group,
            topics=tuple(c.spec.topic for c in members),
            handled=sum(c.stats.handled for c in members),
            ignored=sum(c.stats.unhandled + c.stats.filtered for c in members),
            retries=sum(c.stats.failed_calls for c in members),
            dead_lettered=sum(c.stats.dead_lettered for c in members),
        )
        for group, members in by_group.items()
    ]
