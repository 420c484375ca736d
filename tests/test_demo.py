"""The flagship demo: every order reaches a final state, on both embedded brokers, and the
summary tells a consistent story."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from herald.demo import DemoResult, play, run_demo

ORDERS = 30  # with seed 7: some sold out, some declined, some express


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def quiet() -> Console:
    return Console(file=io.StringIO(), width=120)


async def run(url: str) -> DemoResult:
    return await play(url, orders=ORDERS, seed=7, console=quiet(), arrival_interval=0, timeout=30)


@pytest.mark.anyio
@pytest.mark.parametrize("transport", ["memory", "sqlite"])
async def test_every_order_reaches_a_final_state(transport: str, tmp_path: Path) -> None:
    url = "memory://" if transport == "memory" else f"sqlite:///{tmp_path / 'demo.db'}"
    r = await run(url)

    assert r.ok and r.exit_code == 0
    assert r.closed == ORDERS and not r.open_orders
    assert r.dead_letters == 0
    assert r.broken_chains == []  # each order's events all carried its correlation id

    shipped = r.outcomes["shipped"]
    sold_out = r.outcomes["out_of_stock"]
    declined = r.outcomes["payment_declined"]
    assert shipped > 0 and sold_out > 0 and declined > 0
    assert shipped + sold_out + declined == ORDERS
    # the express filter routed some shipments, the plain handler the rest
    assert r.shipped_by_service["express"] > 0 and r.shipped_by_service["standard"] > 0
    assert sum(r.shipped_by_service.values()) == shipped
    assert sum(r.paid_orders.values()) == shipped
    assert set(r.revenue) == set(r.paid_orders)
    assert sum(r.notifications.values()) == ORDERS
    assert len(r.notifications) > 1

    handled = {g.group: g.handled for g in r.groups}
    assert handled == {
        "inventory": ORDERS,
        "payments": ORDERS - sold_out,
        "shipping": shipped,
        "notifications": ORDERS,
        "orders": ORDERS,
    }


@pytest.mark.anyio
async def test_same_seed_tells_the_same_story(tmp_path: Path) -> None:
    a = await run("memory://")
    b = await run(f"sqlite:///{tmp_path / 'demo.db'}")
    assert a.outcomes == b.outcomes
    assert a.revenue == b.revenue
    assert a.notifications == b.notifications


def test_run_demo_prints_a_summary_and_exits_zero(tmp_path: Path) -> None:
    buf = io.StringIO()
    console = Console(file=buf, width=120)
    code = run_demo(
        f"sqlite:///{tmp_path / 'demo.db'}", orders=12, console=console, arrival_interval=0
    )
    out = buf.getvalue()
    assert code == 0
    assert "OrderPlaced" in out and "CustomerNotified" in out
    assert "Summary" in out and "dead letters: 0" in out
    assert "every order reached a final state" in out


def test_run_demo_exits_one_and_names_what_is_missing() -> None:
    buf = io.StringIO()
    code = run_demo("memory://", orders=5, console=Console(file=buf, width=120), timeout=0)
    out = buf.getvalue()
    assert code == 1
    assert "never reached a final state" in out and "ORD-0005" in out


def test_python_m_herald_demo() -> None:
    env = {**os.environ, "PYTHONIOENCODING": "utf-8", "COLUMNS": "120"}
    proc = subprocess.run(
        [sys.executable, "-m", "herald.demo", "--orders", "20"],
        capture_output=True,
        text=True,
        encoding="utf-8",
        env=env,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "every order reached a final state" in proc.stdout
