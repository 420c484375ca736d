"""Each middleware's behaviour, and combinations, on every transport (``broker_url``)."""

from __future__ import annotations

import importlib
import inspect
import itertools
import logging
import pkgutil
import time
from typing import Any

import anyio
import pydantic
import pytest

import herald.middleware as middleware_package
from herald import App, Context, Retry, dead_letter_topic
from herald.middleware import CircuitBreaker, MaxInFlight, Middleware, RateLimit, Timeout
from herald.middleware.base import CallNext
from herald.middleware.deadletter import skipped_topic

from .conftest import topic, wait_until
from .test_app import read_topic

pytestmark = pytest.mark.anyio

NO_REDELIVERY = Retry(attempts=1, deliveries=1)


class Job(pydantic.BaseModel):
    n: int


class Recorder(Middleware):
    """Records the order middlewares run in."""

    def __init__(self, name: str, log: list[str]) -> None:
        self.name, self.log = name, log

    async def handle(self, ctx: Context, call_next: CallNext) -> Any:
        self.log.append(f"{self.name}>")
        try:
            return await call_next()
        finally:
            self.log.append(f"<{self.name}")


async def test_app_middleware_wraps_subscriber_middleware(broker_url: str) -> None:
    t = topic()
    log: list[str] = []
    app = App("svc", broker=broker_url, middleware=[Recorder("app", log)])

    @app.subscriber(t, group="g", middleware=[Recorder("sub", log)])
    async def handle(e: Job) -> None:
        log.append("handler")

    async with app:
        await app.publish(t, Job(n=1))
        await wait_until(lambda: "<app" in log)
    assert log == ["app>", "sub>", "handler", "<sub", "<app"]


async def test_middleware_that_does_not_call_next_acks_without_handling(broker_url: str) -> None:
    t = topic()
    calls: list[int] = []

    class DropOdd(Middleware):
        async def handle(self, ctx: Context, call_next: CallNext) -> Any:
            if int(ctx.message.key or 0) % 2:
                return None
            return await call_next()

    app = App("svc", broker=broker_url, middleware=[DropOdd()])

    @app.subscriber(t, group="g")
    async def handle(e: Job) -> None:
        calls.append(e.n)

    async with app:
        for i in range(6):
            await app.publish(t, Job(n=i), key=str(i))
        await wait_until(lambda: len(calls) == 3)
        await anyio.sleep(0.1)
    assert sorted(calls) == [0, 2, 4]  # distinct keys: no order promise across them


async def test_timeout_fails_slow_handler_and_dead_letters(broker_url: str) -> None:
    t = topic()
    app = App("svc", broker=broker_url, retry=NO_REDELIVERY)

    @app.subscriber(t, group="g", middleware=[Timeout(0.05)])
    async def slow(e: Job) -> None:
        await anyio.sleep(5)

    async with app:
        started = time.monotonic()
        await app.publish(t, Job(n=1))
        [letter] = await read_topic(app, dead_letter_topic(t, "g"), 1)
        assert time.monotonic() - started < 4
    assert letter.headers["dlq.error_type"] == "builtins.TimeoutError"
    assert "longer than 0.05s" in letter.headers["dlq.error"]


async def test_retry_inside_timeout_shares_one_deadline(broker_url: str) -> None:
    """[Timeout, Retry]: all retries together must fit in the timeout."""
    t = topic()
    calls = 0
    app = App("svc", broker=broker_url, retry=NO_REDELIVERY)
    retry = Retry(attempts=50, delay=0.02, factor=1.0, deliveries=1)

    @app.subscriber(t, group="g", middleware=[Timeout(0.3), retry])
    async def failing(e: Job) -> None:
        nonlocal calls
        calls += 1
        raise RuntimeError("down")

    async with app:
        await app.publish(t, Job(n=1))
        [letter] = await read_topic(app, dead_letter_topic(t, "g"), 1)
    assert 2 <= calls < 50  # cut short by the shared deadline
    assert letter.headers["dlq.error_type"] == "builtins.TimeoutError"


async def test_circuit_breaker_delays_instead_of_failing(broker_url: str) -> None:
    t = topic()
    calls: list[float] = []
    healthy_after = 3
    app = App(
        "svc", broker=broker_url, retry=Retry(attempts=1, deliveries=20, redelivery_delay=0.01)
    )
    breaker = CircuitBreaker(failures=2, reset_after=0.4)

    @app.subscriber(t, group="g", middleware=[breaker])
    async def flaky(e: Job) -> None:
        calls.append(time.monotonic())
        if len(calls) <= healthy_after:
            raise ConnectionError("dependency down")

    async with app:
        for i in range(5):
            await app.publish(t, Job(n=i))
        await wait_until(lambda: app.consumers[0].stats.handled == 5)
    # calls 1-2 fail and open the circuit; call 3 is a probe at least reset_after later, it
    # fails and re-opens; call 4 is the next probe, again reset_after later, and succeeds
    assert calls[2] - calls[1] >= 0.35
    assert calls[3] - calls[2] >= 0.35
    assert app.consumers == []


async def test_rate_limit_spaces_calls(broker_url: str) -> None:
    t = topic()
    stamps: list[float] = []
    app = App("svc", broker=broker_url)

    @app.subscriber(t, group="g", middleware=[RateLimit(rate=20, burst=1)])
    async def handle(e: Job) -> None:
        stamps.append(time.monotonic())

    async with app:
        await app.publish_many(t, [Job(n=i) for i in range(8)])
        await wait_until(lambda: len(stamps) == 8)
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    assert min(gaps) >= 0.045  # 1/20 s, less scheduling slack


async def test_max_in_flight_is_shared_across_groups(broker_url: str) -> None:
    t = topic()
    running = peak = done = 0
    app = App("svc", broker=broker_url, middleware=[MaxInFlight(3)])

    async def work() -> None:
        nonlocal running, peak, done
        running += 1
        peak = max(peak, running)
        await anyio.sleep(0.03)
        running -= 1
        done += 1

    @app.subscriber(t, group="a", concurrency=4)
    async def a(e: Job) -> None:
        await work()

    @app.subscriber(t, group="b", concurrency=4)
    async def b(e: Job) -> None:
        await work()

    async with app:
        await app.publish_many(t, [Job(n=i) for i in range(10)])
        await wait_until(lambda: done == 20)
    assert peak == 3


async def test_cascade_limit_dead_letters_runaway_chain(broker_url: str) -> None:
    t = topic()
    hops_seen: list[str] = []
    app = App("svc", broker=broker_url, cascade_limit=5)

    @app.subscriber(t, group="loop")
    async def echo(e: Job, ctx: Context) -> None:
        hops_seen.append(ctx.headers.get("hops", "0"))
        await ctx.publish(t, Job(n=e.n + 1))  # feeds itself forever

    async with app:
        await app.publish(t, Job(n=0))
        [letter] = await read_topic(app, dead_letter_topic(t, "loop"), 1)
    assert hops_seen == ["0", "1", "2", "3", "4", "5"]
    assert letter.headers["dlq.reason"] == "cascade limit"
    assert letter.headers["hops"] == "5"
    assert letter.headers["dlq.error_type"] == "herald.errors.CascadeLimitExceeded"


async def test_unhandled_types_are_skipped_to_a_topic_when_configured(broker_url: str) -> None:
    t = topic()
    got: list[int] = []
    app = App("svc", broker=broker_url, unhandled="skip")

    @app.subscriber(t, group="g")
    async def handle(e: Job) -> None:
        got.append(e.n)

    async with app:
        await app.publish(t, {"other": 1}, type="Unrelated")
        await app.publish(t, Job(n=7))
        [skipped] = await read_topic(app, skipped_topic(t, "g"), 1)
        await wait_until(lambda: got == [7])
    assert skipped.type == "Unrelated"
    assert skipped.payload == b'{"other":1}'
    assert skipped.headers["skipped.group"] == "g"


async def test_unhandled_types_are_acked_and_counted_by_default(broker_url: str) -> None:
    t = topic()
    got: list[int] = []
    app = App("svc", broker=broker_url)

    @app.subscriber(t, group="g")
    async def handle(e: Job) -> None:
        got.append(e.n)

    async with app:
        await app.publish(t, {"other": 1}, type="Unrelated")
        await app.publish(t, Job(n=7))
        await wait_until(lambda: got == [7])
        assert app.consumers[0].stats.unhandled == 1


def test_middleware_arguments_are_checked() -> None:
    with pytest.raises(ValueError):
        Timeout(0)
    with pytest.raises(ValueError):
        CircuitBreaker(failures=0)
    with pytest.raises(ValueError):
        RateLimit(rate=0)
    with pytest.raises(ValueError):
        MaxInFlight(0)
    with pytest.raises(TypeError, match="Middleware objects"):
        App("svc", broker="memory://", middleware=[object()])  # type: ignore[list-item]


async def test_retry_inside_a_transactional_inbox_is_refused() -> None:
    from herald.inbox import MemoryInbox
    from herald.middleware.dedupe import Dedupe

    app = App("svc", broker="memory://")

    @app.subscriber("t", group="g", middleware=[Dedupe(MemoryInbox(), transactional=True), Retry()])
    async def handle(e: Job) -> None: ...

    with pytest.raises(ValueError, match="outside"):
        await app.start()
    assert app.consumers == []


async def test_retry_inside_timeout_inside_circuit_breaker(broker_url: str) -> None:
    """The documented combination: each delivery's retries share one deadline, and the
    breaker counts one failure per delivery (not per retry)."""
    t = topic()
    calls = 0
    breaker = CircuitBreaker(failures=2, reset_after=0.3)
    app = App(
        "svc", broker=broker_url, retry=Retry(attempts=1, deliveries=3, redelivery_delay=0.01)
    )
    inner = Retry(attempts=3, delay=0.001, factor=1.0, deliveries=3, redelivery_delay=0.01)

    @app.subscriber(t, group="g", middleware=[breaker, Timeout(1.0), inner])
    async def flaky(e: Job) -> None:
        nonlocal calls
        calls += 1
        if calls <= 6:  # two deliveries x three in-process attempts fail, then it recovers
            raise ConnectionError("down")

    async with app:
        started = time.monotonic()
        await app.publish(t, Job(n=1))
        await wait_until(lambda: app.consumers[0].stats.handled == 1)
        took = time.monotonic() - started
    assert calls == 7
    assert took >= 0.25  # the breaker opened after the 2nd failed delivery and held the 3rd


def test_every_middleware_is_exported_from_the_package() -> None:
    defined = {
        cls.__name__: cls
        for info in pkgutil.iter_modules(middleware_package.__path__)
        for _, cls in inspect.getmembers(
            importlib.import_module(f"herald.middleware.{info.name}"), inspect.isclass
        )
        if issubclass(cls, Middleware) and cls.__module__ == f"herald.middleware.{info.name}"
    }
    assert {"CircuitBreaker", "Dedupe", "MaxInFlight", "RateLimit", "Retry", "Timeout"} <= set(
        defined
    )
    for name, cls in {**defined, "CallNext": CallNext}.items():
        assert name in middleware_package.__all__, name
        assert getattr(middleware_package, name) is cls, name


async def test_an_unhandled_type_is_logged_once_per_group_and_type(
    broker_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    t = topic()
    got: list[int] = []
    app = App("svc", broker=broker_url)

    @app.subscriber(t, group="g")
    async def handle(e: Job) -> None:
        got.append(e.n)

    caplog.set_level(logging.WARNING, logger="herald.consumer")
    async with app:
        await app.publish(t, {"n": 1}, type="JobV2")
        await app.publish(t, {"n": 2}, type="JobV2")
        await app.publish(t, Job(n=7))
        await wait_until(lambda: got == [7])
        stats = app.consumers[0].stats
    warnings = [r for r in caplog.records if "no handler takes type" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    text = warnings[0].getMessage()
    assert "'JobV2'" in text and "group g" in text and 'unhandled="skip"' in text
    assert warnings[0].levelno == logging.WARNING
    assert stats.unhandled == 2
    assert stats.unhandled_types == {"JobV2": 2}
