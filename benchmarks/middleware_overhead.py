"""What recoverability costs: Herald's default stack against a bare consume loop.

For each transport (memory, sqlite) and N events (~100 bytes of JSON), end to end with ack:

* ``bare``: the same App publishing, but consumed by a hand-written loop straight on the
  transport — fetch, decode, call the handler, ack — with no retries, dead letters or stats.
* ``default``: an App subscriber with the defaults on (Retry + dead letters + stats counters).
* ``chain``: the default plus ``Timeout`` and ``CircuitBreaker`` (the onion chain path).
* ``inbox``: the default plus ``dedupe=True`` (the transport's default inbox).

Targets (issue #3): ``default`` within 15 % of ``bare``; ``inbox`` on sqlite within 35 %.
Run: ``python benchmarks/middleware_overhead.py [N]``. Each figure is the best of 3 runs.
"""

from __future__ import annotations

import gc
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio

from herald import App
from herald.bench import Reading
from herald.codec import decoder_for
from herald.middleware import CircuitBreaker, Timeout

BATCH = 1000
RUNS = 3


def url_for(transport: str) -> str:
    if transport == "memory":
        return "memory://"
    return f"sqlite:///{tempfile.mkdtemp(prefix='herald-mw-')}/bench.db"


async def publish(app: App, topic: str, n: int) -> None:
    sent = 0
    while sent < n:
        k = min(BATCH, n - sent)
        await app.publish_many(
            topic, [Reading(sensor="s", seq=sent + i, celsius=1.5) for i in range(k)]
        )
        sent += k


async def bare(url: str, n: int) -> float:
    app = App("bench", broker=url)
    handled = 0

    async def handler(r: Reading) -> None:
        nonlocal handled
        handled += 1

    decode = decoder_for(Reading).raw
    async with app:
        sub = await app.transport.subscribe("bench", "bare")
        t0 = time.perf_counter()

        async def consume() -> None:
            while handled < n:
                batch = await sub.fetch(256, 1.0)
                for d in batch:
                    await handler(decode(d.message))
                await sub.ack(batch)

        async with anyio.create_task_group() as tg:
            tg.start_soon(consume)
            await publish(app, "bench", n)
        elapsed = time.perf_counter() - t0
        await sub.close()
    return n / elapsed


async def with_app(url: str, n: int, **subscriber: Any) -> float:
    app = App("bench", broker=url)
    done = anyio.Event()
    handled = 0

    @app.subscriber("bench", group="app", **subscriber)
    async def handler(r: Reading) -> None:
        nonlocal handled
        handled += 1
        if handled == n:
            done.set()

    async with app:
        t0 = time.perf_counter()
        await publish(app, "bench", n)
        await done.wait()
        await app.stop()  # flushes the last acks (and inbox records)
        elapsed = time.perf_counter() - t0
    return n / elapsed


VARIANTS: dict[str, Callable[[str, int], Awaitable[float]]] = {
    "bare": bare,
    "default": with_app,
    "chain": lambda url, n: with_app(
        url, n, middleware=[CircuitBreaker(failures=5, reset_after=1.0), Timeout(5.0)]
    ),
    "inbox": lambda url, n: with_app(url, n, dedupe=True),
}


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    gc.freeze()  # like a `herald run` worker; applies to every variant alike
    print(f"N = {n:,} events, end to end with ack, best of {RUNS}")
    for transport in ("memory", "sqlite"):
        figures: dict[str, float] = {}
        for name, variant in VARIANTS.items():
            figures[name] = max(anyio.run(variant, url_for(transport), n) for _ in range(RUNS))
        base = figures["bare"]
        for name, rate in figures.items():
            cost = (1 - rate / base) * 100
            note = "" if name == "bare" else f"  ({cost:+.1f}% cost vs bare)"
            print(f"  {transport:6} {name:8} {rate:>10,.0f} msgs/s{note}")


if __name__ == "__main__":
    main()
