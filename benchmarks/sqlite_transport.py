"""Throughput of the SQLite transport on its own (no App, no codec).

Run: ``python benchmarks/sqlite_transport.py [N] [BATCH] [synchronous]``
(defaults: 100000, 1000, full).

N messages with 100-byte payloads and two headers are built first (not timed), then:

* publish: batched publishes of BATCH messages, each batch one fsync'd commit;
* fetch+ack (drain): one consumer fetches BATCH at a time and acks each batch;
* end-to-end: a publisher task and a consumer task on one transport at the same time, timed
  from the first publish to the last ack returning (acks are durable on return).

The log is cleaned of consumed messages as it runs, as in production, so its cost is counted.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

import anyio

from herald.message import Message, new_id, utc_now_rfc3339
from herald.transports import Transport
from herald.transports.sqlite import SqliteTransport

TOPIC = "bench"


def build(n: int) -> list[Message]:
    payload = os.urandom(100)
    headers = {"content_type": "application/json", "occurred_at": utc_now_rfc3339()}
    return [
        Message(id=new_id(), topic=TOPIC, payload=payload, type="bench.Event", headers=headers)
        for _ in range(n)
    ]


async def publish_all(t: Transport, messages: list[Message], batch: int) -> None:
    for start in range(0, len(messages), batch):
        await t.publish(TOPIC, messages[start : start + batch])


async def drain(t: Transport, group: str, n: int, batch: int) -> None:
    sub = await t.subscribe(TOPIC, group)
    got = 0
    while got < n:
        deliveries = await sub.fetch(batch, timeout=5.0)
        if not deliveries:
            raise RuntimeError(f"consumer starved after {got} of {n} messages")
        got += len(deliveries)
        await sub.ack(deliveries)
    await sub.close()


def report(label: str, n: int, elapsed: float) -> None:
    print(f"{label:<19}{n / elapsed:>10,.0f} msgs/s  ({elapsed:.2f} s)")


async def main(n: int, batch: int, synchronous: str) -> None:
    messages = build(n)
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{tmp}/bench.db?synchronous={synchronous}"
        print(f"N={n} batch={batch} synchronous={synchronous} payload=100 B, 2 headers")

        async with SqliteTransport.from_url(url) as t:
            # The group exists before publishing, as in a running system.
            await (await t.subscribe(TOPIC, "drain")).close()
            start = time.perf_counter()
            await publish_all(t, messages, batch)
            report("publish:", n, time.perf_counter() - start)

            start = time.perf_counter()
            await drain(t, "drain", n, batch)
            report("fetch+ack (drain):", n, time.perf_counter() - start)

        async with SqliteTransport.from_url(url) as t:
            await (await t.subscribe(TOPIC, "live", start="latest")).close()
            start = time.perf_counter()
            async with anyio.create_task_group() as tg:
                tg.start_soon(publish_all, t, messages, batch)
                tg.start_soon(drain, t, "live", n, batch)
            report("end-to-end:", n, time.perf_counter() - start)
        size = sum(os.path.getsize(os.path.join(tmp, f)) for f in os.listdir(tmp))
        print(f"database files after the run: {size / 1e6:.1f} MB")


if __name__ == "__main__":
    args = sys.argv[1:]
    anyio.run(
        main,
        int(args[0]) if args else 100_000,
        int(args[1]) if len(args) > 1 else 1000,
        args[2] if len(args) > 2 else "full",
    )
