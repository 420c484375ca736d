"""Scheduled publish (``delay=`` / ``at=``): never before its due time, soon after it, kept
across restarts, the message unchanged. The behaviour tests run once per transport
(``broker_url``); each uses its own schedule topic so parallel runs on the shared servers do not
forward each other's messages."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import anyio
import pytest

import herald
from herald import App, Context, Message, dead_letter_topic
from herald.codec import encode_many
from herald.message import CAUSATION_ID, CONTENT_TYPE, CORRELATION_ID, OCCURRED_AT, SOURCE
from herald.scheduler import (
    DUE_HEADER,
    HOLD,
    LEAD,
    MAX_STEP,
    SCHEDULER_GROUP,
    TARGET_HEADER,
    next_wait,
    read_schedule,
    to_schedule,
)
from herald.testing.helpers import unique_name

from .conftest import topic, wait_until
from .test_app import read_topic

pytestmark = pytest.mark.anyio

#: how late a message may arrive and still pass: generous (a Kafka group join takes seconds)
LATE = 30.0


class Arrivals:
    """A handler that records each message with the wall-clock time it arrived."""

    def __init__(self) -> None:
        self.got: list[tuple[float, Message]] = []

    async def record(self, m: Message) -> None:
        self.got.append((time.time(), m))

    def by_id(self) -> dict[str, tuple[float, Message]]:
        return {m.id: (t, m) for t, m in self.got}

    async def wait_for(self, n: int, timeout: float = LATE) -> None:
        await wait_until(lambda: len(self.got) >= n, timeout)


def make_app(
    url: str, schedule: str, target: str | None = None, group: str | None = None, **kw: bool
) -> tuple[App, Arrivals]:
    """An App on ``url`` with its own schedule topic; with ``target``, a group (``group``, or
    a fresh one) recording what arrives there."""
    app = App("sched", broker=url, schedule_topic=schedule, **kw)
    seen = Arrivals()
    if target is not None:
        app.subscriber(target, group=group or unique_name("g"))(seen.record)
    return app, seen


def herald_env() -> dict[str, str]:
    """The environment for a subprocess that imports the herald under test, from any cwd."""
    return {**os.environ, "PYTHONPATH": str(Path(herald.__file__).resolve().parents[1])}


def shared_bus(url: str) -> str:
    """``memory://`` gives each transport its own bus; a restart test needs one named bus."""
    return f"memory://{unique_name('bus')}" if url == "memory://" else url


async def test_scheduled_message_arrives_after_its_due_time_unchanged(broker_url: str) -> None:
    target, schedule = topic(), topic()
    app, seen = make_app(broker_url, schedule, target)
    event = {"order": 7}
    async with app:
        due = time.time() + 1.5
        mid = await app.publish(
            target, event, delay=timedelta(seconds=1.5), key="o-7", type="Timeout",
            headers={"tenant": "acme"},
        )  # fmt: skip
        due_float = time.time() + 1.0
        mid_float = await app.publish(target, event, delay=1.0)
        await seen.wait_for(2)
        await anyio.sleep(0.5)  # nothing more arrives: one delivery each
    got = seen.by_id()
    assert len(seen.got) == 2
    arrived, m = got[mid]
    assert due <= arrived < due + LATE
    assert due_float <= got[mid_float][0] < due_float + LATE
    # the message as it was published: id, key, type, headers and payload
    assert (m.key, m.type, m.topic) == ("o-7", "Timeout", target)
    assert m.payload == encode_many([event], "json")[0][0]
    assert set(m.headers) == {CORRELATION_ID, OCCURRED_AT, SOURCE, CONTENT_TYPE, "tenant"}
    assert (m.headers[CORRELATION_ID], m.headers["tenant"], m.headers[SOURCE]) == (
        mid,
        "acme",
        "sched",
    )


async def test_batch_and_ctx_publish_schedule_too(broker_url: str) -> None:
    inbound, target, schedule = topic(), topic(), topic()
    app, seen = make_app(broker_url, schedule, target)
    caused: list[str] = []

    @app.subscriber(inbound, group=unique_name("g"))
    async def react(m: Message, ctx: Context) -> None:
        caused.append(m.id)
        await ctx.publish(target, {"timeout": m.id}, delay=timedelta(seconds=1))

    async with app:
        due = time.time() + 1.0
        ids = await app.publish_many(target, [{"n": 1}, {"n": 2}, {"n": 3}], delay=1.0)
        trigger = await app.publish(inbound, {"start": True}, key="saga-1")
        await seen.wait_for(4)
    got = seen.by_id()
    for mid in ids:
        assert due <= got[mid][0] < due + LATE
    (timeout,) = [m for _, m in seen.got if m.id not in ids]
    assert caused == [trigger]
    # ctx.publish keeps the causal chain and the key through the schedule
    assert timeout.headers[CAUSATION_ID] == trigger
    assert timeout.headers[CORRELATION_ID] == trigger
    assert timeout.key == "saga-1"


async def test_scheduled_message_survives_an_app_restart(broker_url: str) -> None:
    url = shared_bus(broker_url)
    target, schedule = topic(), topic()
    group = unique_name("g")
    first, _ = make_app(url, schedule, target, group)
    async with first:
        due = time.time() + 3.0
        mid = await first.publish(target, {"kept": True}, delay=3.0)
        stopped = first.scheduler
    assert stopped is not None and stopped.stats.forwarded == 0  # stopped before it was due
    second, seen = make_app(url, schedule, target, group)
    async with second:
        await seen.wait_for(1)
    ((arrived, m),) = seen.got
    assert m.id == mid
    assert due <= arrived < due + LATE


async def test_long_delays_wait_in_capped_steps_and_attempts_never_dead_letter(
    broker_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # with a 64 ms cap the 2 s before the last stretch are many waits, each a redelivery
    # with attempt + 1
    monkeypatch.setattr("herald.scheduler.MAX_STEP", 0.064)
    target, schedule = topic(), topic()
    app, seen = make_app(broker_url, schedule, target)
    async with app:
        assert app.scheduler is not None
        await app.scheduler.joined.wait()  # a Kafka join does not eat the waits
        due = time.time() + HOLD + 2.0
        mid = await app.publish(target, {"long": True}, delay=HOLD + 2.0)
        await seen.wait_for(1)
        stats = app.scheduler.stats
        assert stats.waits >= 5  # ~30, or ~10 where a hop takes 200 ms (Kafka on Tansu)
        assert stats.dead_lettered == 0
    ((arrived, m),) = seen.got
    assert m.id == mid
    assert due <= arrived < due + LATE


async def test_a_time_already_past_publishes_at_once(broker_url: str) -> None:
    target, schedule = topic(), topic()
    # no scheduler runs: a past due time does not need one
    app, seen = make_app(broker_url, schedule, target, scheduler=False)
    async with app:
        assert app.scheduler is None
        await app.publish(target, {"late": 1}, at=datetime.now(UTC) - timedelta(hours=1))
        await app.publish(target, {"late": 2}, delay=0)
        await seen.wait_for(2, timeout=15)


async def test_at_takes_any_time_zone(broker_url: str) -> None:
    target, schedule = topic(), topic()
    app, seen = make_app(broker_url, schedule, target)
    plus5 = timezone(timedelta(hours=5))
    async with app:
        at = datetime.now(plus5) + timedelta(seconds=1)
        await app.publish(target, {"tz": "+05:00"}, at=at)
        await seen.wait_for(1)
    ((arrived, _),) = seen.got
    assert at.timestamp() <= arrived < at.timestamp() + LATE


async def test_messages_wait_while_no_scheduler_runs(broker_url: str) -> None:
    url = shared_bus(broker_url)
    target, schedule = topic(), topic()
    # a scheduler ran once, so the schedule group exists (MQTT keeps messages only for groups
    # that exist; see the README); then only an App without one runs
    async with make_app(url, schedule)[0]:
        pass
    group = unique_name("g")
    quiet, seen = make_app(url, schedule, target, group, scheduler=False)
    async with quiet:
        due = time.time() + 0.3
        mid = await quiet.publish(target, {"waits": True}, delay=0.3)
        await anyio.sleep(1.5)
        assert seen.got == []  # due, but nobody forwards it
    worker, seen = make_app(url, schedule, target, group)
    async with worker:
        await seen.wait_for(1)
    ((arrived, m),) = seen.got
    assert m.id == mid and arrived >= due


async def test_a_message_without_a_valid_schedule_is_dead_lettered(broker_url: str) -> None:
    target, schedule = topic(), topic()
    app, seen = make_app(broker_url, schedule, target)
    async with app:
        good = await app.publish(target, {"ok": 1}, delay=0.2)
        # what a plain client might put on the schedule topic: no due time, a bad target
        await app.publish(schedule, {"no": "headers"})
        await app.publish(schedule, {"bad": 1}, headers={TARGET_HEADER: "no/such", DUE_HEADER: "x"})
        letters = await read_topic(app, dead_letter_topic(schedule, SCHEDULER_GROUP), 2, LATE)
        await seen.wait_for(1)
    assert [m.id for _, m in seen.got] == [good]
    assert {m.headers["dlq.reason"] for m in letters} == {"invalid schedule"}
    assert app.scheduler is None  # stopped


@pytest.mark.parametrize("engine", ["memory", "sqlite"])
async def test_scheduled_publish_in_a_transactional_subscriber_commits_with_the_ack(
    engine: str, tmp_path: Path
) -> None:
    url = "memory://" if engine == "memory" else f"sqlite:///{tmp_path / 'tx.db'}"
    inbound, target, schedule = topic(), topic(), topic()
    app, seen = make_app(url, schedule, target)
    calls: list[int] = []

    @app.subscriber(inbound, group="tx", transactional=True)
    async def react(m: Message, ctx: Context) -> None:
        calls.append(1)
        await ctx.publish(target, {"later": True}, delay=0.5)
        if len(calls) == 1:
            raise RuntimeError("the first attempt's scheduled publish never goes out")

    async with app:
        due = time.time() + 0.5
        await app.publish(inbound, {"go": True})
        await seen.wait_for(1)
        await anyio.sleep(1.0)
    assert len(calls) == 2
    assert len(seen.got) == 1
    assert seen.got[0][0] >= due


async def test_sqlite_schedule_survives_a_process_restart(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'broker.db'}"
    target, schedule = topic(), topic()
    group = unique_name("g")
    # the group exists before the publishing process runs, as a deployed service's would
    async with make_app(url, schedule, target, group)[0]:
        pass
    script = textwrap.dedent(f"""
        import time, anyio
        from herald import App

        async def main():
            async with App("publisher", broker={url!r}, schedule_topic={schedule!r}) as app:
                print(time.time() + 2.0, await app.publish({target!r}, {{"n": 1}}, delay=2.0))

        anyio.run(main)
    """)
    out = subprocess.run(
        [sys.executable, "-c", script],
        env=herald_env(), capture_output=True, text=True, timeout=60, check=True,
    ).stdout.split()  # fmt: skip
    due, mid = float(out[0]), out[1]
    assert time.time() < due  # the publishing process is gone before the message is due
    worker, seen = make_app(url, schedule, target, group)
    async with worker:
        await seen.wait_for(1)
    ((arrived, m),) = seen.got
    assert m.id == mid
    assert due <= arrived < due + LATE


# --- bad input and the pieces -----------------------------------------------------------


async def test_bad_schedule_input_is_a_clear_error() -> None:
    app = App("bad", broker="memory://")
    t = topic()
    soon = datetime.now(UTC) + timedelta(minutes=1)
    cases: list[tuple[Callable[[], object], type[Exception], str]] = [
        (lambda: app.publish(t, 1, at=datetime.now() + timedelta(minutes=1)), ValueError, "naive"),
        (lambda: app.publish(t, 1, delay=timedelta(seconds=-1)), ValueError, ">= 0"),
        (lambda: app.publish(t, 1, delay=-0.5), ValueError, ">= 0"),
        (lambda: app.publish(t, 1, delay=math.nan), ValueError, "finite"),
        (lambda: app.publish(t, 1, delay=math.inf), ValueError, "finite"),
        (lambda: app.publish(t, 1, delay=1, at=soon), ValueError, "not both"),
        (lambda: app.publish(t, 1, delay="5"), TypeError, "timedelta"),  # type: ignore[arg-type]
        (lambda: app.publish(t, 1, delay=soon), TypeError, "at="),  # type: ignore[arg-type]
        (lambda: app.publish(t, 1, delay=True), TypeError, "timedelta"),
        (lambda: app.publish(t, 1, at=soon.date()), TypeError, "datetime"),  # type: ignore[arg-type]
        (lambda: app.publish(t, 1, at="2030-01-01T00:00:00Z"), TypeError, "datetime"),  # type: ignore[arg-type]
        (lambda: app.publish(t, 1, delay=timedelta(days=3_000_000)), ValueError, "too far"),
        (lambda: app.publish_many(t, [1], at=datetime(2030, 1, 1)), ValueError, "naive"),
        (
            lambda: app.publish(t, 1, delay=1, headers={TARGET_HEADER: "x"}),
            ValueError,
            "scheduler's own",
        ),
    ]
    async with app:
        for call, error, text in cases:
            with pytest.raises(error, match=text):
                await call()  # type: ignore[misc]
    with pytest.raises(ValueError, match="schedule topic"):
        App("bad", broker="memory://", schedule_topic="no spaces")


def test_next_wait_is_a_capped_power_of_two_of_milliseconds_that_comes_back_early() -> None:
    assert next_wait(86_400 * 7) == MAX_STEP == 262.144
    assert next_wait(MAX_STEP + LEAD) == MAX_STEP
    assert next_wait(10.0) == 8.192
    assert next_wait(HOLD + 0.001) == 0.512
    assert next_wait(LEAD) == 0.0
    for remaining in (2.1, 2.5, 3.3, 61.0, 250.0):
        wait = next_wait(remaining)
        ms = round(wait * 1000)
        assert ms & (ms - 1) == 0  # a power of two
        assert (remaining - LEAD) / 2 < wait <= remaining - LEAD


def test_read_schedule_restores_the_message_and_rounds_the_due_time_up() -> None:
    app = App("unit", broker="memory://")
    m = app.message("orders", {"n": 1}, headers={"replay_group": SCHEDULER_GROUP, "a": "b"})
    due = 1_800_000_000.1234
    stored = to_schedule([m], due, app.schedule_topic)
    assert stored[0].topic == app.schedule_topic
    assert stored[0].headers[DUE_HEADER] == "2027-01-15T08:00:00.124Z"
    back, at = read_schedule(stored[0])
    assert at == 1_800_000_000.124 >= due
    # the forwarded copy is the original, and a replay of a scheduler dead letter is for all
    assert back.replace(headers={**back.headers, "replay_group": SCHEDULER_GROUP}) == m
    assert "replay_group" not in back.headers
    assert to_schedule([m], time.time() - 1, app.schedule_topic) == [m]  # past: as it is


def test_readme_example_runs(tmp_path: Path) -> None:
    readme = Path(__file__).resolve().parents[1] / "README.md"
    section = readme.read_text().split("## Scheduled publish", 1)[1]
    code = section.split("```python", 1)[1].split("```", 1)[0]
    script = tmp_path / "payments.py"
    script.write_text(code)
    done = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path, env=herald_env(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "payment for o-0 timed out",
        "payment for o-1 timed out",
    ]
