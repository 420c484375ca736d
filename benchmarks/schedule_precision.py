"""How late scheduled messages arrive, per transport (``publish(..., delay=...)``).

For each transport an App runs its scheduler and one subscriber on a target topic. Two loads:

* ``spread``: N messages (default 200) published one by one, each with a random delay between
  0.1 s and 8 s — some only held by the scheduler, most nacked to the broker first, some
  several times;
* ``burst``: B messages (default 500) in one ``publish_many`` with a 3 s delay, all due at the
  same moment — what forwarding a batch costs;
* ``direct``: the baseline, 50 messages published without a delay: the engine's own
  publish-to-handler latency, which every scheduled message pays once more when forwarded.

Lateness = arrival in the handler minus (time before the publish call + delay), so the publish
call's own duration counts as lateness: the figures err on the late side. ``early`` counts
messages that arrived before their due time (must be 0). Prints one line per transport and load:
median, p99 and max lateness in milliseconds.

    python benchmarks/schedule_precision.py                 # every transport whose server is up
    python benchmarks/schedule_precision.py sqlite redis    # some of them
    N=100 B=200 python benchmarks/schedule_precision.py

Servers as in the test suite (127.0.0.1: Redis 6379, RabbitMQ 5672, NATS 4222, Mosquitto 1883,
Kafka-protocol brokers Tansu 9092 and noida-db 9093); a server that is down is skipped.
"""

from __future__ import annotations

import os
import random
import statistics
import sys
import tempfile
import time

import anyio

from herald import App, Message
from herald.message import new_id
from herald.testing.servers import reachable
from herald.transports import open_transport

URLS = {
    "memory": "memory://",
    "sqlite": "",  # a fresh file
    "redis": "redis://127.0.0.1:6379/0",
    "rabbitmq": "amqp://guest:guest@127.0.0.1:5672/",
    "nats": "nats://127.0.0.1:4222",
    "mqtt": "mqtt://127.0.0.1:1883",
    "kafka-tansu": "kafka://127.0.0.1:9092",
    "kafka-noida": "kafka://127.0.0.1:9093",
}


def _up(url: str) -> bool:
    if "://127.0.0.1:" not in url:
        return True
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    return reachable("127.0.0.1", port)


def _ms(values: list[float]) -> tuple[float, float, float]:
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return statistics.median(ordered) * 1000, p99 * 1000, ordered[-1] * 1000


async def measure(url: str, n: int, burst: int) -> dict[str, list[float]]:
    """Lateness in seconds of every message, per load."""
    suffix = new_id()[-12:]
    target, schedule = f"bench.sched.{suffix}", f"bench.schedule.{suffix}"
    app = App("bench", broker=url, schedule_topic=schedule)
    arrived: dict[str, float] = {}

    @app.subscriber(target, group=f"bench-{suffix}")
    async def record(m: Message) -> None:
        arrived.setdefault(m.id, time.time())

    due: dict[str, tuple[str, float]] = {}
    try:
        async with app:
            assert app.scheduler is not None
            await app.scheduler.joined.wait()  # a Kafka join is not what is measured
            for _ in range(50):
                before = time.time()
                due[await app.publish(target, {"now": True})] = ("direct", before)
                await anyio.sleep(0.01)
            rng = random.Random(7)
            for _ in range(n):
                delay = rng.uniform(0.1, 8.0)
                before = time.time()
                mid = await app.publish(target, {"delay": delay}, delay=delay)
                due[mid] = ("spread", before + delay)
                await anyio.sleep(0.005)
            before = time.time()
            ids = await app.publish_many(target, [{"n": i} for i in range(burst)], delay=3.0)
            for mid in ids:
                due[mid] = ("burst", before + 3.0)
            with anyio.move_on_after(60):
                while len(arrived) < len(due):
                    await anyio.sleep(0.05)
    finally:
        async with open_transport(url) as t:
            for name in (target, schedule):
                await t.delete_topic(name)
    missing = len(due) - len(arrived)
    if missing:
        print(f"  {missing} message(s) did not arrive within 60 s", file=sys.stderr)
    out: dict[str, list[float]] = {"direct": [], "spread": [], "burst": []}
    for mid, at in arrived.items():
        load, when = due[mid]
        out[load].append(at - when)
    return out


async def main(names: list[str]) -> None:
    n, burst = int(os.environ.get("N", "200")), int(os.environ.get("B", "500"))
    head = f"{'transport':<12} {'load':<7} {'n':>5} {'early':>5}"
    print(f"{head} {'median':>9} {'p99':>9} {'max':>9}")
    for name in names:
        url = URLS[name] or f"sqlite:///{tempfile.mkdtemp(prefix='herald-sched-')}/bench.db"
        if not _up(url):
            print(f"{name:<12} (server down, skipped)")
            continue
        results = await measure(url, n, burst)
        for load, lateness in results.items():
            if not lateness:
                continue
            early = sum(1 for x in lateness if x < 0)
            med, p99, top = _ms(lateness)
            print(
                f"{name:<12} {load:<7} {len(lateness):>5} {early:>5} "
                f"{med:>7.1f}ms {p99:>7.1f}ms {top:>7.1f}ms",
                flush=True,
            )


if __name__ == "__main__":
    chosen = sys.argv[1:] or list(URLS)
    unknown = [c for c in chosen if c not in URLS]
    if unknown:
        sys.exit(f"unknown transport(s) {unknown}; choose from {list(URLS)}")
    anyio.run(main, chosen)
