"""Redis Streams: Herald vs the raw redis-py asyncio client vs FastStream, doing the same work.

Raw: ``redis.asyncio`` with its defaults; publish ``XADD <stream> * payload <json>`` in
pipelined batches of 1000 (one round trip per batch); one consumer reads
``XREADGROUP ... COUNT 256 BLOCK 1000``, parses each JSON payload and ``XACK``s each batch with
one command. FastStream: a ``RedisBroker`` stream subscriber with a consumer group (ack after
the handler), publishes through a pipeline per batch of 1000. Each measurement uses a fresh
stream and deletes it afterwards.

Whether ``hiredis`` is installed changes every side (redis-py parses replies in C with it);
:func:`parser` says which one ran.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import time
from typing import Any

import redis.asyncio as aioredis

from benchmarks.compare.common import fresh_name, paced, payload, sent_at

NAME = "redis"
DEFAULT_URL = "redis://127.0.0.1:6379/0"

_BATCH = 1000  # XADDs per pipeline
_FETCH = 256  # entries per XREADGROUP (Herald's default prefetch)
_GROUP = "bench"


def parser() -> str:
    """The reply parser redis-py uses here."""
    return "hiredis" if importlib.util.find_spec("hiredis") else "pure Python"


def _server(url: str) -> str:
    return url.split("?", 1)[0]  # Herald's options mean nothing to redis-py


async def _consume(
    r: Any, stream: str, stop: asyncio.Event, on_entry: Any, total: int | None = None
) -> None:
    got = 0
    while not stop.is_set() and (total is None or got < total):
        reply = await r.xreadgroup(_GROUP, "c1", {stream: ">"}, count=_FETCH, block=200)
        if not reply:
            continue
        entries = reply[0][1] if isinstance(reply, list) else next(iter(reply.values()))[0]
        for _eid, fields in entries:
            on_entry(fields[b"payload"])
        got += len(entries)
        await r.xack(stream, _GROUP, *[eid for eid, _ in entries])


async def raw_throughput(url: str, n: int) -> float:
    r = aioredis.from_url(_server(url))
    stream = fresh_name("rawtp")
    await r.xgroup_create(stream, _GROUP, id="0", mkstream=True)
    try:
        stop = asyncio.Event()
        t0 = time.perf_counter()
        consumer = asyncio.create_task(_consume(r, stream, stop, json.loads, total=n))
        sent = 0
        while sent < n:
            k = min(_BATCH, n - sent)
            pipe = r.pipeline(transaction=False)
            for i in range(k):
                pipe.xadd(stream, {"payload": payload(sent + i)})
            await pipe.execute()
            sent += k
        await consumer
        return n / (time.perf_counter() - t0)
    finally:
        await r.delete(stream)
        await r.aclose()


async def raw_latency(url: str, rate: float, seconds: float) -> list[float]:
    r = aioredis.from_url(_server(url))
    stream = fresh_name("rawlat")
    await r.xgroup_create(stream, _GROUP, id="0", mkstream=True)
    latencies: list[float] = []
    expected = int(rate * seconds)
    try:
        stop = asyncio.Event()

        def record(body: bytes) -> None:
            latencies.append(time.time() - sent_at(body))

        consumer = asyncio.create_task(_consume(r, stream, stop, record, total=expected))

        async def send(seq: int) -> None:
            await r.xadd(stream, {"payload": payload(seq)})

        await paced(rate, seconds, send)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(consumer, 10)
        return latencies
    finally:
        await r.delete(stream)
        await r.aclose()


# --- FastStream ------------------------------------------------------------------------------


def _faststream_broker(url: str) -> Any:
    from faststream.redis import RedisBroker

    return RedisBroker(_server(url), logger=None)


async def faststream_throughput(url: str, n: int) -> float:
    from faststream.redis import StreamSub

    broker = _faststream_broker(url)
    stream = fresh_name("fstp")
    done = asyncio.Event()
    count = 0

    @broker.subscriber(stream=StreamSub(stream, group=_GROUP, consumer="c1", last_id="0"))
    async def handle(body: dict[str, Any]) -> None:
        nonlocal count
        count += 1
        if count >= n:
            done.set()

    r = aioredis.from_url(_server(url))  # FastStream queues its XADDs on this pipeline
    await broker.start()
    try:
        t0 = time.perf_counter()
        sent = 0
        while sent < n:
            k = min(_BATCH, n - sent)
            pipe = r.pipeline(transaction=False)
            for i in range(k):
                await broker.publish(payload(sent + i), stream=stream, pipeline=pipe)
            await pipe.execute()
            sent += k
        await asyncio.wait_for(done.wait(), timeout=max(60.0, n / 500))
        return n / (time.perf_counter() - t0)
    finally:
        await broker.stop()
        await r.delete(stream)
        await r.aclose()


async def faststream_latency(url: str, rate: float, seconds: float) -> list[float]:
    from faststream.redis import StreamSub

    broker = _faststream_broker(url)
    stream = fresh_name("fslat")
    latencies: list[float] = []
    expected = int(rate * seconds)

    @broker.subscriber(stream=StreamSub(stream, group=_GROUP, consumer="c1", last_id="0"))
    async def handle(body: bytes) -> None:
        latencies.append(time.time() - sent_at(body))

    await broker.start()
    try:

        async def send(seq: int) -> None:
            await broker.publish(payload(seq), stream=stream)

        await paced(rate, seconds, send)
        deadline = time.monotonic() + 10
        while len(latencies) < expected and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return latencies
    finally:
        await broker.stop()
        r = aioredis.from_url(_server(url))
        await r.delete(stream)
        await r.aclose()


if __name__ == "__main__":  # pragma: no cover - a quick look without the whole comparison
    import sys

    from benchmarks.compare.common import herald_latency, herald_throughput

    n = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    print(f"parser: {parser()}")
    raw = asyncio.run(raw_throughput(DEFAULT_URL, n))
    herald = asyncio.run(herald_throughput(DEFAULT_URL, n))
    print(f"raw {raw:,.0f} msgs/s, herald {herald:,.0f} msgs/s ({herald / raw:.2f}x)")
    for side, fn in (("raw", raw_latency), ("herald", herald_latency)):
        lat = sorted(asyncio.run(fn(DEFAULT_URL, 2000, 5)))
        p50, p99 = lat[len(lat) // 2], lat[min(len(lat) - 1, int(0.99 * len(lat)))]
        print(f"{side} latency at 2000/s: p50 {p50 * 1000:.2f} ms, p99 {p99 * 1000:.2f} ms")
