"""App behaviour, identical on every transport: each test runs once per ``broker_url``."""

from __future__ import annotations

import threading
from typing import Any

import anyio
import msgspec
import pydantic
import pytest

from herald import App, Context, Message, Permanent, Retry, dead_letter_topic
from herald.dlq import tool_group
from herald.message import new_id, utc_now_rfc3339

from .conftest import topic, wait_until

pytestmark = pytest.mark.anyio

FAST_RETRY = Retry(attempts=2, delay=0.001, deliveries=3, redelivery_delay=0.01, factor=1.0)


class OrderPlaced(pydantic.BaseModel):
    order_id: str
    amount: float = 1.0
    priority: str = "normal"


class StockReserved(msgspec.Struct):
    order_id: str


class PaymentCaptured(msgspec.Struct):
    order_id: str
    amount: float


async def read_topic(url_app: App, name: str, n: int, timeout: float = 10) -> list[Message]:
    """Read ``n`` dead letters (or skipped messages) of ``name`` as the DLQ tooling does: in its
    group, which the app makes sure exists on brokers that keep messages only for groups."""
    sub = await url_app.transport.subscribe(name, tool_group(name))
    out: list[Message] = []
    try:
        with anyio.fail_after(timeout):
            while len(out) < n:
                batch = await sub.fetch(n - len(out), 0.2)
                await sub.ack(batch)
                out += [d.message for d in batch]
    finally:
        await sub.close()
    return out


async def test_every_group_gets_every_message(broker_url: str) -> None:
    t = topic()
    app = App("svc", broker=broker_url)
    seen: dict[str, list[str]] = {"a": [], "b": []}

    @app.subscriber(t, group="a")
    async def a(e: OrderPlaced) -> None:
        seen["a"].append(e.order_id)

    @app.subscriber(t, group="b")
    async def b(e: OrderPlaced) -> None:
        seen["b"].append(e.order_id)

    async with app:
        await app.publish_many(t, [OrderPlaced(order_id=str(i)) for i in range(50)])
        await wait_until(lambda: len(seen["a"]) == 50 and len(seen["b"]) == 50)
    assert sorted(seen["a"], key=int) == [str(i) for i in range(50)]
    assert sorted(seen["b"], key=int) == [str(i) for i in range(50)]


async def test_causal_publish_copies_correlation_and_sets_causation(broker_url: str) -> None:
    orders, stock = topic(), topic()
    app = App("shop", broker=broker_url)
    got: list[tuple[StockReserved, Context]] = []

    @app.subscriber(orders, group="inventory")
    async def reserve(e: OrderPlaced, ctx: Context) -> None:
        await ctx.publish(stock, StockReserved(order_id=e.order_id), key=e.order_id)

    @app.subscriber(stock, group="audit")
    async def audit(e: StockReserved, ctx: Context) -> None:
        got.append((e, ctx))

    async with app:
        root = await app.publish(orders, OrderPlaced(order_id="o1"), key="o1")
        await wait_until(lambda: len(got) == 1)
    event, ctx = got[0]
    assert event == StockReserved(order_id="o1")
    h = ctx.message.headers
    assert h["correlation_id"] == root
    assert h["causation_id"] == root
    assert h["hops"] == "1"
    assert h["source"] == "shop"
    assert ctx.message.type == "StockReserved"
    assert ctx.message.key == "o1"
    assert ctx.attempt == 1


@pytest.mark.parametrize("order", ["publisher-inside", "publisher-outside"])
async def test_publisher_publishes_return_value(broker_url: str, order: str) -> None:
    orders, payments = topic(), topic()
    app = App("shop", broker=broker_url)
    got: list[tuple[PaymentCaptured, Message]] = []

    async def charge(e: OrderPlaced) -> PaymentCaptured | None:
        return PaymentCaptured(order_id=e.order_id, amount=e.amount) if e.amount > 0 else None

    if order == "publisher-inside":
        app.subscriber(orders, group="billing")(app.publisher(payments)(charge))
    else:
        app.publisher(payments)(app.subscriber(orders, group="billing")(charge))

    @app.subscriber(payments, group="ledger")
    async def ledger(e: PaymentCaptured, ctx: Context) -> None:
        got.append((e, ctx.message))

    async with app:
        root = await app.publish(orders, OrderPlaced(order_id="o7", amount=12.5))
        await app.publish(orders, OrderPlaced(order_id="free", amount=0))  # returns None
        await wait_until(lambda: len(got) == 1)
        await anyio.sleep(0.2)
    assert len(got) == 1
    assert got[0][0] == PaymentCaptured(order_id="o7", amount=12.5)
    assert got[0][1].headers["causation_id"] == root


async def test_sync_handler_runs_in_a_worker_thread(broker_url: str) -> None:
    orders, out = topic(), topic()
    app = App("svc", broker=broker_url)
    threads: list[int] = []
    done: list[str] = []

    @app.subscriber(orders, group="sync")
    def blocking(e: OrderPlaced, ctx: Context) -> None:
        threads.append(threading.get_ident())
        ctx.publish_sync(out, StockReserved(order_id=e.order_id))

    @app.subscriber(out, group="sink")
    async def sink(e: StockReserved) -> None:
        done.append(e.order_id)

    async with app:
        await app.publish(orders, OrderPlaced(order_id="s1"))
        await wait_until(lambda: done == ["s1"])
    assert threads and threads[0] != threading.get_ident()


async def test_handlers_in_one_group_dispatch_by_type(broker_url: str) -> None:
    t = topic()
    app = App("svc", broker=broker_url)
    got: list[Any] = []

    @app.subscriber(t, group="g")
    async def on_order(e: OrderPlaced) -> None:
        got.append(e)

    @app.subscriber(t, group="g")
    async def on_stock(e: StockReserved | PaymentCaptured) -> None:
        got.append(e)

    async with app:
        await app.publish(t, OrderPlaced(order_id="1"))
        await app.publish(t, StockReserved(order_id="2"))
        await app.publish(t, PaymentCaptured(order_id="3", amount=1))
        await app.publish(t, {"unknown": True}, type="SomethingElse")
        await wait_until(lambda: len(got) == 3)
        await wait_until(lambda: app.consumers[0].stats.unhandled == 1)
    assert sorted(type(e).__name__ for e in got) == [
        "OrderPlaced",
        "PaymentCaptured",
        "StockReserved",
    ]


async def test_filter_routes_by_content(broker_url: str) -> None:
    t = topic()
    app = App("shipping", broker=broker_url)
    express: list[str] = []
    normal: list[str] = []

    @app.subscriber(t, group="ship", filter=lambda m: m.headers.get("priority") == "high")
    async def ship_express(e: OrderPlaced) -> None:
        express.append(e.order_id)

    @app.subscriber(t, group="ship")
    async def ship_normal(e: OrderPlaced) -> None:
        normal.append(e.order_id)

    async with app:
        for i in range(20):
            prio = "high" if i % 4 == 0 else "normal"
            await app.publish(t, OrderPlaced(order_id=str(i)), headers={"priority": prio})
        await wait_until(lambda: len(express) + len(normal) == 20)
    # keyless messages have no order promise (Kafka spreads them over partitions)
    assert sorted(express, key=int) == ["0", "4", "8", "12", "16"]
    assert sorted(normal, key=int) == [str(i) for i in range(20) if i % 4]


async def test_failing_handler_is_retried_and_isolated(broker_url: str) -> None:
    t = topic()
    app = App("svc", broker=broker_url, retry=FAST_RETRY)
    calls: list[int] = []
    healthy: list[str] = []

    @app.subscriber(t, group="flaky")
    async def flaky(e: OrderPlaced, ctx: Context) -> None:
        calls.append(ctx.attempt)
        if len(calls) < 3:  # fails twice in-process on delivery 1, succeeds on delivery 2
            raise RuntimeError("transient")

    @app.subscriber(t, group="healthy")
    async def fine(e: OrderPlaced) -> None:
        healthy.append(e.order_id)

    async with app:
        await app.publish(t, OrderPlaced(order_id="x"))
        await wait_until(lambda: app.consumers[0].stats.handled == 1)
        await wait_until(lambda: healthy == ["x"])
    assert calls == [1, 1, 2]
    assert app.consumers == []  # cleared on stop


async def test_exhausted_retries_go_to_dead_letters_with_reason(broker_url: str) -> None:
    t = topic()
    app = App("svc", broker=broker_url, retry=FAST_RETRY)
    calls = 0

    @app.subscriber(t, group="billing")
    async def broken(e: OrderPlaced) -> None:
        nonlocal calls
        calls += 1
        raise ValueError("card processor down")

    async with app:
        mid = await app.publish(t, OrderPlaced(order_id="d1"), key="d1")
        [letter] = await read_topic(app, dead_letter_topic(t, "billing"), 1)
    assert calls == FAST_RETRY.attempts * FAST_RETRY.deliveries
    h = letter.headers
    assert h["dlq.reason"] == "retries exhausted"
    assert h["dlq.original_id"] == mid
    assert h["dlq.original_topic"] == t
    assert h["dlq.group"] == "billing"
    assert h["dlq.handler"].endswith("broken")
    assert h["dlq.error_type"] == "builtins.ValueError"
    assert h["dlq.error"] == "card processor down"
    assert "Traceback" in h["dlq.traceback"]
    assert h["dlq.attempts"] == str(FAST_RETRY.deliveries)
    assert h["dlq.first_failure_at"] <= h["dlq.last_failure_at"]
    assert letter.payload == OrderPlaced(order_id="d1").model_dump_json().encode()
    assert letter.key == "d1"
    assert letter.type == "OrderPlaced"


async def test_permanent_error_dead_letters_at_once(broker_url: str) -> None:
    t = topic()
    app = App("svc", broker=broker_url, retry=FAST_RETRY)
    calls = 0

    @app.subscriber(t, group="g")
    async def reject(e: OrderPlaced) -> None:
        nonlocal calls
        calls += 1
        raise Permanent("order is for a closed account")

    async with app:
        await app.publish(t, OrderPlaced(order_id="p"))
        [letter] = await read_topic(app, dead_letter_topic(t, "g"), 1)
    assert calls == 1
    assert letter.headers["dlq.reason"] == "permanent error"


async def test_malformed_payloads_never_crash_the_worker(broker_url: str) -> None:
    t = topic()
    app = App("svc", broker=broker_url)
    good: list[str] = []

    @app.subscriber(t, group="g")
    async def handle(e: OrderPlaced) -> None:
        good.append(e.order_id)

    bad_payloads = [b"", b"{oops", b'{"order_id": 1}', bytes(range(256)), b"null"]
    async with app:
        raw = [
            Message(id=new_id(), topic=t, payload=p, type="OrderPlaced", headers={})
            for p in bad_payloads
        ]
        await app.transport.publish(t, raw[:3])
        await app.publish(t, OrderPlaced(order_id="ok1"))
        await app.transport.publish(t, raw[3:])
        await app.publish(t, OrderPlaced(order_id="ok2"))
        letters = await read_topic(app, dead_letter_topic(t, "g"), len(bad_payloads))
        await wait_until(lambda: good == ["ok1", "ok2"])
    assert sorted(m.payload for m in letters) == sorted(bad_payloads)
    assert {m.headers["dlq.reason"] for m in letters} == {"undecodable payload"}
    assert all("OrderPlaced" in m.headers["dlq.error"] for m in letters)


async def test_concurrency_runs_handlers_at_once(broker_url: str) -> None:
    t = topic()
    app = App("svc", broker=broker_url)
    running = peak = done = 0

    @app.subscriber(t, group="g", concurrency=4)
    async def slow(e: OrderPlaced) -> None:
        nonlocal running, peak, done
        running += 1
        peak = max(peak, running)
        await anyio.sleep(0.05)
        running -= 1
        done += 1

    async with app:
        await app.publish_many(t, [OrderPlaced(order_id=str(i)) for i in range(12)])
        await wait_until(lambda: done == 12)
    assert peak == 4


async def test_ordered_keeps_per_key_order_with_concurrency(broker_url: str) -> None:
    t = topic()
    app = App("svc", broker=broker_url)
    seen: dict[str, list[int]] = {}

    @app.subscriber(t, group="g", concurrency=4, ordered=True)
    async def handle(e: OrderPlaced, ctx: Context) -> None:
        await anyio.sleep(0.001 * (hash(e.order_id) % 3))
        assert ctx.message.key is not None
        seen.setdefault(ctx.message.key, []).append(int(e.order_id))

    async with app:
        for i in range(200):
            await app.publish(t, OrderPlaced(order_id=str(i)), key=f"k{i % 7}")
        await wait_until(lambda: sum(map(len, seen.values())) == 200)
    for numbers in seen.values():
        assert numbers == sorted(numbers)


async def test_msgpack_apps_interoperate_with_json_apps(broker_url: str) -> None:
    t = topic()
    producer = App("producer", broker=broker_url, format="msgpack")
    got: list[OrderPlaced] = []
    producer_ct: list[str] = []

    @producer.subscriber(t, group="g")
    async def handle(e: OrderPlaced, ctx: Context) -> None:
        got.append(e)
        producer_ct.append(ctx.headers["content_type"])

    async with producer:
        await producer.publish(t, OrderPlaced(order_id="m", amount=2.5))
        await wait_until(lambda: len(got) == 1)
    assert got == [OrderPlaced(order_id="m", amount=2.5)]
    assert producer_ct == ["application/msgpack"]


async def test_stop_waits_for_running_handler_and_acks_it(broker_url: str) -> None:
    t = topic()
    app = App("svc", broker=broker_url)
    started = anyio.Event()
    finished: list[str] = []

    @app.subscriber(t, group="g")
    async def slow(e: OrderPlaced) -> None:
        started.set()
        await anyio.sleep(0.3)
        finished.append(e.order_id)

    async with app:
        await app.publish(t, OrderPlaced(order_id="inflight"))
        await started.wait()
    assert finished == ["inflight"]  # stop() waited for it


async def test_registration_errors_are_raised_at_decoration() -> None:
    app = App("svc", broker="memory://")

    class Opaque:
        pass

    with pytest.raises(TypeError, match="cannot decode"):

        @app.subscriber("t")
        async def bad_annotation(e: Opaque) -> None: ...

    with pytest.raises(TypeError, match="cannot fill"):

        @app.subscriber("t")
        async def extra(e: OrderPlaced, other: int) -> None: ...

    @app.subscriber("t", group="g")
    async def first(e: OrderPlaced) -> None: ...

    with pytest.raises(TypeError, match="can never run"):

        @app.subscriber("t", group="g")
        async def second(e: OrderPlaced) -> None: ...

    with pytest.raises(ValueError, match="invalid topic"):
        app.subscriber("bad topic!")


async def test_bad_publish_and_bad_urls_are_clear_errors() -> None:
    with pytest.raises(ValueError, match=r"unknown broker URL scheme 'nope'.*memory://.*sqlite://"):
        App("svc", broker="nope://x")
    app = App("svc", broker="memory://")
    async with app:
        with pytest.raises(TypeError, match="cannot serialise"):
            await app.publish("t", object())
        with pytest.raises(TypeError, match="names and values must be str"):
            await app.publish("t", {"a": 1}, headers={"n": 1})  # type: ignore[dict-item]
        with pytest.raises(ValueError, match="invalid topic"):
            await app.publish("", {"a": 1})


async def test_message_annotation_receives_every_type_and_keys_are_inherited(
    broker_url: str,
) -> None:
    a, b = topic(), topic()
    app = App("svc", broker=broker_url)
    raw: list[Message] = []

    @app.subscriber(a, group="g")
    @app.publisher(b)
    async def convert(e: OrderPlaced) -> StockReserved:
        return StockReserved(order_id=e.order_id)

    @app.subscriber(b, group="h")
    async def tap(m: Message) -> None:
        raw.append(m)

    async with app:
        await app.publish(a, OrderPlaced(order_id="o1"), key="order-1")
        await wait_until(lambda: len(raw) == 1)
    assert raw[0].type == "StockReserved"
    assert raw[0].key == "order-1"  # @publisher and ctx.publish inherit the incoming key


async def test_oversized_payloads_are_refused_on_publish_and_dead_lettered_on_consume(
    broker_url: str,
) -> None:
    t = topic()
    app = App("svc", broker=broker_url, max_payload=1000)
    got: list[bytes] = []

    @app.subscriber(t, group="g")
    async def handle(e: bytes) -> None:
        got.append(e)

    async with app:
        with pytest.raises(ValueError, match="exceeds the app's max_payload of 1,000 bytes"):
            await app.publish(t, b"x" * 1001)
        big = Message(id=new_id(), topic=t, payload=b"y" * 5000, headers={})
        await app.transport.publish(t, [big])  # a plain client ignores our limit
        await app.publish(t, b"ok")
        [letter] = await read_topic(app, dead_letter_topic(t, "g"), 1)
        await wait_until(lambda: got == [b"ok"])
    assert letter.headers["dlq.reason"] == "oversized payload"
    assert letter.payload == big.payload


async def test_first_failure_time_is_kept_across_redeliveries(broker_url: str) -> None:
    t = topic()
    retry = Retry(attempts=1, delay=0.001, deliveries=3, redelivery_delay=0.05, factor=1.0)
    app = App("svc", broker=broker_url, retry=retry)
    failed_at: list[str] = []

    @app.subscriber(t, group="billing")
    async def broken(e: OrderPlaced) -> None:
        failed_at.append(utc_now_rfc3339())
        await anyio.sleep(0.01)  # the failures are milliseconds apart whatever the clock
        raise ValueError("still down")

    async with app:
        await app.publish(t, OrderPlaced(order_id="f1"))
        [letter] = await read_topic(app, dead_letter_topic(t, "billing"), 1)
    h = letter.headers
    assert len(failed_at) == 3
    assert failed_at[0] <= h["dlq.first_failure_at"] < failed_at[1]
    assert h["dlq.first_failure_at"] < h["dlq.last_failure_at"]
