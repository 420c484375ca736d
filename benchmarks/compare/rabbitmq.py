"""RabbitMQ comparison: a plain aio-pika client and FastStream doing what Herald does.

All three use a durable topic exchange, one durable classic queue bound with ``#`` (Herald's
group queue type), persistent messages with publisher confirms, prefetch 256 and manual acks.
Interface: see ``benchmarks/compare/common.py``.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aio_pika
import anyio

from benchmarks.compare.common import fresh_name, paced, payload, sent_at

NAME = "rabbitmq"
DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672/"
PREFETCH = 256
BATCH = 1000
_QUEUE_ARGS = {"x-queue-type": "classic"}


async def _setup(
    url: str, prefix: str
) -> tuple[aio_pika.abc.AbstractConnection, aio_pika.abc.AbstractChannel, str]:
    conn = await aio_pika.connect(url)
    channel = await conn.channel(publisher_confirms=True)
    await channel.set_qos(prefetch_count=PREFETCH)
    return conn, channel, fresh_name(prefix)


async def _declare(
    channel: aio_pika.abc.AbstractChannel, name: str
) -> tuple[aio_pika.abc.AbstractExchange, aio_pika.abc.AbstractQueue]:
    exchange = await channel.declare_exchange(name, aio_pika.ExchangeType.TOPIC, durable=True)
    queue = await channel.declare_queue(f"{name}:g", durable=True, arguments=_QUEUE_ARGS)
    await queue.bind(exchange, "#")
    return exchange, queue


async def raw_throughput(url: str, n: int) -> float:
    conn, channel, name = await _setup(url, "rawtp")
    try:
        exchange, queue = await _declare(channel, name)
        done = asyncio.Event()
        count = 0

        async def on_message(msg: aio_pika.abc.AbstractIncomingMessage) -> None:
            nonlocal count
            count += 1
            if count % 64 == 0 or count == n:  # batch acks, like Herald's per-fetch ack
                await msg.ack(multiple=True)
            if count == n:
                done.set()

        await queue.consume(on_message)
        t0 = time.perf_counter()
        sent = 0
        while sent < n:
            k = min(BATCH, n - sent)
            await asyncio.gather(
                *[
                    exchange.publish(
                        aio_pika.Message(
                            payload(sent + i), delivery_mode=aio_pika.DeliveryMode.PERSISTENT
                        ),
                        routing_key="",
                    )
                    for i in range(k)
                ]
            )
            sent += k
        await done.wait()
        seconds = time.perf_counter() - t0
        await queue.delete(if_unused=False, if_empty=False)
        await exchange.delete()
        return n / seconds
    finally:
        await conn.close()


async def raw_latency(url: str, rate: float, seconds: float) -> list[float]:
    conn, channel, name = await _setup(url, "rawlat")
    latencies: list[float] = []
    try:
        exchange, queue = await _declare(channel, name)

        async def on_message(msg: aio_pika.abc.AbstractIncomingMessage) -> None:
            latencies.append(time.time() - sent_at(msg.body))
            await msg.ack()

        await queue.consume(on_message)

        async def send(seq: int) -> None:
            await exchange.publish(
                aio_pika.Message(payload(seq), delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                routing_key="",
            )

        expected = await paced(rate, seconds, send)
        with anyio.move_on_after(10):
            while len(latencies) < expected:
                await anyio.sleep(0.01)
        await queue.delete(if_unused=False, if_empty=False)
        await exchange.delete()
        return latencies
    finally:
        await conn.close()


def _faststream(url: str, name: str):  # type: ignore[no-untyped-def]
    from faststream.rabbit import ExchangeType, RabbitBroker, RabbitExchange, RabbitQueue

    broker = RabbitBroker(url)  # publisher confirms are on by default
    exchange = RabbitExchange(name, type=ExchangeType.TOPIC, durable=True)
    queue = RabbitQueue(f"{name}:g", durable=True, routing_key="#", arguments=_QUEUE_ARGS)
    return broker, exchange, queue


async def _fs_cleanup(url: str, name: str) -> None:
    conn = await aio_pika.connect(url)
    try:
        channel = await conn.channel()
        await channel.queue_delete(f"{name}:g")
        await channel.exchange_delete(name)
    finally:
        await conn.close()


async def faststream_throughput(url: str, n: int) -> float:
    from faststream.rabbit import RabbitMessage

    name = fresh_name("fstp")
    broker, exchange, queue = _faststream(url, name)
    done = asyncio.Event()
    count = 0

    @broker.subscriber(queue, exchange)
    async def handle(body: dict[str, Any], msg: RabbitMessage) -> None:
        nonlocal count
        count += 1
        if count == n:
            done.set()

    try:
        async with broker:
            await broker.start()
            t0 = time.perf_counter()
            sent = 0
            while sent < n:
                k = min(BATCH, n - sent)
                await asyncio.gather(
                    *[
                        broker.publish(payload(sent + i), exchange=exchange, routing_key="")
                        for i in range(k)
                    ]
                )
                sent += k
            await done.wait()
            seconds = time.perf_counter() - t0
    finally:
        await _fs_cleanup(url, name)
    return n / seconds


async def faststream_latency(url: str, rate: float, seconds: float) -> list[float]:
    name = fresh_name("fslat")
    broker, exchange, queue = _faststream(url, name)
    latencies: list[float] = []

    @broker.subscriber(queue, exchange)
    async def handle(body: dict[str, Any]) -> None:  # FastStream decodes the JSON itself
        latencies.append(time.time() - float(body["sent_at"]))

    try:
        async with broker:
            await broker.start()

            async def send(seq: int) -> None:
                await broker.publish(payload(seq), exchange=exchange, routing_key="")

            expected = await paced(rate, seconds, send)
            with anyio.move_on_after(10):
                while len(latencies) < expected:
                    await anyio.sleep(0.01)
    finally:
        await _fs_cleanup(url, name)
    return latencies


if __name__ == "__main__":  # pragma: no cover - manual runs
    import statistics
    import sys

    from benchmarks.compare.common import herald_latency, herald_throughput

    which = sys.argv[1] if len(sys.argv) > 1 else "all"
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 100_000

    def pct(xs: list[float], p: float) -> float:
        xs = sorted(xs)
        return xs[min(len(xs) - 1, int(len(xs) * p))] * 1000

    async def main() -> None:
        runs = {
            "raw": (raw_throughput, raw_latency),
            "herald": (herald_throughput, herald_latency),
            "faststream": (faststream_throughput, faststream_latency),
        }
        for label, (tp, lat) in runs.items():
            if which not in ("all", label, f"{label}-tp", f"{label}-lat"):
                continue
            if not which.endswith("-lat"):
                print(f"{label} throughput: {await tp(DEFAULT_URL, n):,.0f} msgs/s", flush=True)
            if not which.endswith("-tp"):
                xs = await lat(DEFAULT_URL, 2000, 5)
                print(
                    f"{label} latency @2000/s: n={len(xs)} p50={pct(xs, 0.5):.2f}ms "
                    f"p99={pct(xs, 0.99):.2f}ms mean={statistics.mean(xs) * 1000:.2f}ms",
                    flush=True,
                )

    anyio.run(main)
