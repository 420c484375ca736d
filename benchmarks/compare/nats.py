"""NATS JetStream: Herald vs the raw nats-py client vs FastStream, doing the same work.

Raw: a file-storage stream on a fresh subject; publish with ``js.publish_async`` in batches of
1000, awaiting each batch's PubAcks together; a durable pull consumer fetches batches of 256
and acks each message. FastStream: a ``NatsBroker`` pull subscriber (batches of 256, ack after
the handler) on the same kind of stream; publishes awaited concurrently per batch of 1000.
Each measurement uses a fresh stream and deletes it afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import nats
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StorageType, StreamConfig

from benchmarks.compare.common import fresh_name, paced, payload, sent_at

NAME = "nats"
DEFAULT_URL = "nats://127.0.0.1:4222"

_BATCH = 1000  # publishes whose PubAcks are awaited together
_FETCH = 256  # messages per pull request


def _server(url: str) -> str:
    return url.split("?", 1)[0]


async def _stream(js: Any, name: str) -> None:
    await js.add_stream(StreamConfig(name=name, subjects=[name], storage=StorageType.FILE))


async def raw_throughput(url: str, n: int) -> float:
    nc = await nats.connect(_server(url))
    js = nc.jetstream(publish_async_max_pending=_BATCH * 2)
    name = fresh_name("rawtp").replace(".", "-")
    await _stream(js, name)
    try:
        psub = await js.pull_subscribe(
            name,
            durable="bench",
            config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, max_ack_pending=-1),
        )
        done = asyncio.Event()

        async def consume() -> None:
            got = 0
            while got < n:
                try:
                    msgs = await psub.fetch(_FETCH, timeout=1.0)
                except nats.errors.TimeoutError:
                    continue
                for m in msgs:
                    await m.ack()
                got += len(msgs)
            await nc.flush()
            done.set()

        t0 = time.perf_counter()
        task = asyncio.create_task(consume())
        sent = 0
        while sent < n:
            k = min(_BATCH, n - sent)
            futs = [await js.publish_async(name, payload(sent + i)) for i in range(k)]
            await asyncio.gather(*futs)
            sent += k
        await done.wait()
        seconds = time.perf_counter() - t0
        await task
        return n / seconds
    finally:
        await js.delete_stream(name)
        await nc.close()


async def raw_latency(url: str, rate: float, seconds: float) -> list[float]:
    nc = await nats.connect(_server(url))
    js = nc.jetstream()
    name = fresh_name("rawlat").replace(".", "-")
    await _stream(js, name)
    latencies: list[float] = []
    expected = int(rate * seconds)
    try:
        psub = await js.pull_subscribe(
            name,
            durable="lat",
            config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, deliver_policy=DeliverPolicy.ALL),
        )

        async def consume() -> None:
            while len(latencies) < expected:
                try:
                    msgs = await psub.fetch(_FETCH, timeout=0.5)
                except nats.errors.TimeoutError:
                    continue
                for m in msgs:
                    latencies.append(time.time() - sent_at(m.data))
                    await m.ack()

        task = asyncio.create_task(consume())

        async def send(seq: int) -> None:
            await js.publish(name, payload(seq))

        await paced(rate, seconds, send)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(task, 10)
        return latencies
    finally:
        await js.delete_stream(name)
        await nc.close()


def _faststream_app(url: str, name: str, handler: Any) -> Any:
    from faststream import AckPolicy as FsAck
    from faststream.nats import JStream, NatsBroker, PullSub

    broker = NatsBroker(_server(url), log_level=logging.DEBUG)
    stream = JStream(name=name, subjects=[name])
    broker.subscriber(
        name,
        stream=stream,
        durable="fs",
        pull_sub=PullSub(batch_size=_FETCH, timeout=1.0),
        ack_policy=FsAck.ACK,
    )(handler)
    return broker


async def _drop(url: str, name: str) -> None:
    nc = await nats.connect(_server(url))
    try:
        await nc.jetstream().delete_stream(name)
    except nats.js.errors.NotFoundError:
        pass
    finally:
        await nc.close()


async def faststream_throughput(url: str, n: int) -> float:
    name = fresh_name("fstp").replace(".", "-")
    got = 0
    done = asyncio.Event()

    async def handle(body: dict[str, Any]) -> None:
        nonlocal got
        got += 1
        if got == n:
            done.set()

    broker = _faststream_app(url, name, handle)
    try:
        async with broker:
            await broker.start()
            t0 = time.perf_counter()
            sent = 0
            while sent < n:
                k = min(_BATCH, n - sent)
                await asyncio.gather(
                    *(broker.publish(payload(sent + i), name, stream=name) for i in range(k))
                )
                sent += k
            await done.wait()
            seconds = time.perf_counter() - t0
        return n / seconds
    finally:
        await _drop(url, name)


async def faststream_latency(url: str, rate: float, seconds: float) -> list[float]:
    name = fresh_name("fslat").replace(".", "-")
    latencies: list[float] = []
    expected = int(rate * seconds)

    async def handle(body: dict[str, Any]) -> None:
        latencies.append(time.time() - float(body["sent_at"]))

    broker = _faststream_app(url, name, handle)
    try:
        async with broker:
            await broker.start()

            async def send(seq: int) -> None:
                await broker.publish(payload(seq), name, stream=name)

            await paced(rate, seconds, send)
            deadline = time.monotonic() + 10
            while len(latencies) < expected and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
        return latencies
    finally:
        await _drop(url, name)
