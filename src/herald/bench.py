"""End-to-end throughput benchmark behind ``herald bench``.

One App, one trivial async handler, ``n`` small typed events (about 100 bytes of JSON each)
published in batches while the consumer runs; the clock runs from the first publish until the
handler has seen every event and the last batch is acked. The figure is events per second,
end to end: encode, publish (durably where the transport is durable), fetch, decode, handle, ack.
"""

from __future__ import annotations

import gc
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import anyio
import msgspec

from herald.app import App
from herald.message import new_id
from herald.transports import open_transport

__all__ = ["BenchResult", "Reading", "default_url", "run_bench"]


class Reading(msgspec.Struct):
    """The benchmark event: a sensor reading, ~100 bytes as JSON."""

    sensor: str
    seq: int
    celsius: float
    unit: str = "C"
    site: str = "plant-7/line-2"


@dataclass(frozen=True)
class BenchResult:
    transport: str
    url: str
    n: int
    seconds: float

    @property
    def msgs_per_s(self) -> float:
        return self.n / self.seconds if self.seconds > 0 else float("inf")


#: the local servers' URLs (see ../shared/services.md), used when --broker is not given
LOCAL_URLS = {
    "memory": "memory://",
    "redis": "redis://127.0.0.1:6379/0",
    "rabbitmq": "amqp://guest:guest@127.0.0.1:5672/",
    "kafka": "kafka://127.0.0.1:9092",
    "nats": "nats://127.0.0.1:4222",
    "mqtt": "mqtt://127.0.0.1:1883",
}
#: transport name -> the URL schemes it accepts
SCHEMES = {
    "memory": ("memory",),
    "sqlite": ("sqlite",),
    "redis": ("redis", "rediss"),
    "rabbitmq": ("amqp", "amqps"),
    "kafka": ("kafka",),
    "nats": ("nats", "tls"),
    "mqtt": ("mqtt", "mqtts"),
}


def default_url(transport: str) -> str:
    """The URL ``herald bench TRANSPORT`` uses when ``--broker`` is not given."""
    if transport == "sqlite":
        return f"sqlite:///{tempfile.mkdtemp(prefix='herald-bench-')}/bench.db"
    try:
        return LOCAL_URLS[transport]
    except KeyError:
        raise ValueError(f"no default broker URL for {transport!r}; pass --broker URL") from None


async def run_bench(
    url: str,
    n: int,
    *,
    batch: int = 1000,
    progress: Callable[[int], None] | None = None,
) -> BenchResult:
    """Publish ``n`` events to a fresh topic and time their end-to-end handling."""
    if n < 1:
        raise ValueError("n must be at least 1")
    app = App("bench", broker=url)
    topic = f"bench.{new_id()[-12:]}"
    done = anyio.Event()
    handled = 0

    @app.subscriber(topic, group="bench")
    async def handle(event: Reading) -> None:
        nonlocal handled
        handled += 1
        if handled == n:
            done.set()

    try:
        async with app:
            gc.freeze()  # as a `herald run` worker does once started (see App.serve)
            t0 = time.perf_counter()
            await _publish_and_wait(app, topic, n, batch, done, lambda: handled, progress)
            # consumers stop here; the final acks are flushed before stop() returns
            await app.stop()
            seconds = time.perf_counter() - t0
    finally:
        await _cleanup(url, topic)
    if progress is not None:
        progress(handled)
    return BenchResult(url.split("://", 1)[0], app.transport.url, n, seconds)


async def _publish_and_wait(
    app: App,
    topic: str,
    n: int,
    batch: int,
    done: anyio.Event,
    handled: Callable[[], int],
    progress: Callable[[int], None] | None,
) -> None:
    sent = 0
    # a broker that drops messages past a backlog (Mosquitto) must not be outrun: publish at
    # most that far ahead of the handler, or the benchmark would wait for dropped messages
    window = app.transport.features.max_backlog
    if window is not None:
        batch = max(1, min(batch, window // 2))
    while sent < n:
        k = min(batch, n - sent)
        while window is not None and sent + k - handled() > window:
            await anyio.sleep(0.001)
        await app.publish_many(
            topic, [Reading(sensor="s-17", seq=sent + i, celsius=21.5) for i in range(k)]
        )
        sent += k
        if progress is not None:
            progress(handled())
    while not done.is_set():
        with anyio.move_on_after(0.1):
            await done.wait()
        if progress is not None:
            progress(handled())


async def _cleanup(url: str, topic: str) -> None:
    """Delete the benchmark topic from a server broker (the app has stopped by now)."""
    if url.startswith("memory:"):
        return  # a private in-process bus: gone with the app
    with anyio.CancelScope(shield=True):
        async with open_transport(url) as transport:
            await transport.delete_topic(topic)


if __name__ == "__main__":  # pragma: no cover - convenience for profiling
    import sys

    url = sys.argv[1] if len(sys.argv) > 1 else "memory://"
    r = anyio.run(run_bench, url, int(os.environ.get("N", "200000")))
    print(f"{r.url}: {r.msgs_per_s:,.0f} msgs/s ({r.n} in {r.seconds:.2f}s)")
