"""What every comparison shares: the message, pacing, and the Herald side of each measurement.

A transport module (``benchmarks/compare/<name>.py``) provides, for its engine::

    NAME: str                      # "redis"
    DEFAULT_URL: str               # Herald URL of the local server
    async def raw_throughput(url: str, n: int) -> float          # msgs/s, end to end with ack
    async def faststream_throughput(url: str, n: int) -> float
    async def raw_latency(url: str, rate: float, seconds: float) -> list[float]
    async def faststream_latency(url: str, rate: float, seconds: float) -> list[float]

Throughput: publish ``n`` messages of :func:`payload` (batched/pipelined as the client allows),
consume them with acks, seconds from the first publish to the last ack. Latency: publish
:func:`payload` at ``rate`` msgs/s for ``seconds`` with :func:`paced`, and for each message
consumed record ``time.time() - sent_at(payload)`` in seconds. Each implementation uses a fresh
topic/queue name from :func:`fresh_name` and deletes what it created.

The Herald side is the same for every transport and lives here.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable

import anyio

from herald import App, Context
from herald.bench import run_bench
from herald.message import new_id
from herald.transports import open_transport

__all__ = [
    "fresh_name",
    "herald_latency",
    "herald_throughput",
    "paced",
    "payload",
    "sent_at",
]

_PAD = "x" * 40


def payload(seq: int) -> bytes:
    """A ~100-byte JSON message carrying its send time."""
    return json.dumps({"seq": seq, "sent_at": time.time(), "sensor": "s-17", "pad": _PAD}).encode()


def sent_at(body: bytes) -> float:
    return float(json.loads(body)["sent_at"])


def fresh_name(prefix: str = "cmp") -> str:
    return f"{prefix}.{new_id()[-12:]}"


async def paced(rate: float, seconds: float, send: Callable[[int], Awaitable[None]]) -> int:
    """Call ``send(seq)`` ``rate`` times a second for ``seconds``; return how many were sent."""
    total = int(rate * seconds)
    start = time.perf_counter()
    for seq in range(total):
        due = start + seq / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await anyio.sleep(delay)
        await send(seq)
    return total


async def herald_throughput(url: str, n: int) -> float:
    return (await run_bench(url, n)).msgs_per_s


async def herald_latency(url: str, rate: float, seconds: float) -> list[float]:
    topic = fresh_name("lat")
    app = App("latency", broker=url)
    latencies: list[float] = []
    expected = int(rate * seconds)

    @app.subscriber(topic, group="lat", start="earliest")
    async def handle(body: bytes, ctx: Context) -> None:
        latencies.append(time.time() - sent_at(body))

    async with app:

        async def send(seq: int) -> None:
            await app.publish(topic, payload(seq))

        await paced(rate, seconds, send)
        with anyio.move_on_after(10):
            while len(latencies) < expected:
                await anyio.sleep(0.01)
    # after the app stopped: deleting a topic under a running consumer is not a benchmark
    async with open_transport(url) as transport:
        await transport.delete_topic(topic)
    return latencies
