"""App lifecycle: restart after stop on every transport, stop from another task, a stop request
while the app is still starting (in-process and as a ``herald run`` worker on SIGTERM), and a
consumer that fails while the app runs."""

from __future__ import annotations

import sqlite3
import textwrap
import time
from pathlib import Path

import anyio
import pytest

from herald import App
from herald.lifecycle import StartAborted
from herald.testing.helpers import unique_name
from herald.testing.servers import require_server
from herald.transports import TransportError

from .conftest import BROKERS, free_port, topic, wait_until
from .worker import herald_run

pytestmark = pytest.mark.anyio


def counting_app(url: str, t: str, group: str) -> tuple[App, list[int]]:
    app = App("svc", broker=url)
    seen: list[int] = []

    @app.subscriber(t, group=group)
    async def handle(job: dict[str, int]) -> None:
        seen.append(job["n"])

    return app, seen


async def test_app_starts_again_after_stop(broker_url: str) -> None:
    """start, publish and handle, stop, start again, publish and handle, stop: the second run
    handles the new message (and not the first one again)."""
    t = topic()
    app, seen = counting_app(broker_url, t, unique_name("g"))
    for n in (1, 2):
        await app.start()
        try:
            await app.publish(t, {"n": n})
            await wait_until(lambda n=n: n in seen, timeout=30)  # type: ignore[misc]
        finally:
            await app.stop()
    assert seen == [1, 2]


@pytest.mark.parametrize("broker", ["memory", "sqlite"])
async def test_stop_from_another_task(broker: str, tmp_path: Path) -> None:
    """Started in a task that has ended since, stopped from another: no cancel-scope error,
    a graceful stop; the same for start and stop in one task."""
    url = f"sqlite:///{tmp_path / 'b.db'}" if broker == "sqlite" else "memory://"
    t = topic()
    app, seen = counting_app(url, t, "g")
    async with anyio.create_task_group() as tg:
        tg.start_soon(app.start)
    await app.publish(t, {"n": 1})
    await wait_until(lambda: seen == [1])

    stopped = anyio.Event()

    async def stopper() -> None:
        await app.stop()
        stopped.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(stopper)
    assert stopped.is_set() and app.consumers == []

    await app.start()  # same task for both
    await app.publish(t, {"n": 2})
    await wait_until(lambda: seen == [1, 2])
    await app.stop()


def unreachable_kafka() -> str:
    return f"kafka://127.0.0.1:{free_port()}?connect_timeout=30"


async def test_stop_while_starting_abandons_the_start_at_once() -> None:
    """A connect retrying an unreachable broker for 30 s: stop() from another task ends it at
    once; start() raises StartAborted, the transport is closed, the app can start again."""
    app, _ = counting_app(unreachable_kafka(), "t", "g")
    outcome: list[BaseException] = []

    async def starter() -> None:
        try:
            await app.start()
        except BaseException as e:
            outcome.append(e)

    t0 = time.monotonic()
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(starter)
            await anyio.sleep(1)
            await app.stop()
    assert time.monotonic() - t0 < 5
    assert len(outcome) == 1 and isinstance(outcome[0], StartAborted), outcome
    assert app.consumers == []
    with pytest.raises(TransportError):  # the transport was closed: nothing left connected
        await app.transport.publish("t", [app.message("t", {"n": 1})])


async def test_a_cancelled_start_closes_what_it_opened() -> None:
    app, _ = counting_app(unreachable_kafka(), "t", "g")
    t0 = time.monotonic()
    with anyio.move_on_after(1) as scope:
        await app.start()
    assert scope.cancelled_caught
    assert time.monotonic() - t0 < 5
    await app.stop()  # nothing to stop: returns at once
    async with anyio.create_task_group() as tg:  # a start still under way refuses another
        tg.start_soon(app.start)
        await anyio.sleep(0.2)
        with pytest.raises(RuntimeError, match="already running"):
            await app.start()
        tg.cancel_scope.cancel()
    assert app.consumers == []


async def test_a_consumer_that_fails_stops_the_app_and_stop_raises(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A transport failing under a running consumer (its tables dropped by someone else) stops
    the app at once, logged as an error; stop() raises the transport's error, not a group of
    them; serve() ends on its own with it."""
    db = tmp_path / "b.db"
    app, _ = counting_app(f"sqlite:///{db}", "t", "g")
    await app.start()
    conn = sqlite3.connect(db)
    conn.executescript("DROP TABLE leases; DROP TABLE groups; DROP TABLE messages;")
    conn.close()
    await wait_until(lambda: "stopping the app" in caplog.text)
    with pytest.raises(TransportError, match="no such table"):
        await app.stop()
    await app.stop()  # raised once

    db.unlink()
    for suffix in ("-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    app2, _ = counting_app(f"sqlite:///{db}", "t", "g")
    failed: list[BaseException] = []

    async def serve() -> None:
        try:
            await app2.serve()
        except Exception as e:
            failed.append(e)

    async with anyio.create_task_group() as tg:
        tg.start_soon(serve)
        await wait_until(lambda: app2.consumers != [])
        conn = sqlite3.connect(db)
        conn.executescript("DROP TABLE leases; DROP TABLE groups; DROP TABLE messages;")
        conn.close()
        await wait_until(lambda: failed != [])
    assert isinstance(failed[0], TransportError) and "no such table" in str(failed[0])


# --- a stop signal while starting, as a `herald run` worker ---------------------------------------

SERVICE = textwrap.dedent(
    """
    import os
    from herald import App

    app = App("svc", broker=os.environ["BROKER"])

    @app.subscriber(os.environ["TOPIC"], group=os.environ["GROUP"])
    async def work(job: dict) -> None:
        print("handled", job)
    """
)


def sigterm_while_starting(tmp_path: Path, url: str, wait_for: str, t: str) -> None:
    """Run a worker on ``url``, send SIGTERM 1 s after it began starting (and once
    ``wait_for`` is in its log), and check it exits within a few seconds, with rc 0 and
    Herald's one line saying so."""
    (tmp_path / "svc_module.py").write_text(SERVICE)
    env = {"BROKER": url, "TOPIC": t, "GROUP": unique_name("g")}
    with herald_run("svc_module:app", tmp_path, tmp_path, env) as worker:
        worker.wait_for("svc starting on", stream="stderr")
        time.sleep(1)
        if wait_for:
            worker.wait_for(wait_for, stream="stderr")
        before = len(worker.stderr.splitlines())
        t0 = time.monotonic()
        rc = worker.stop(timeout=20)
        took = time.monotonic() - t0
    log = worker.stderr
    assert rc == 0, log
    assert took < 5, f"exited {took:.1f}s after SIGTERM\n{log}"
    after = log.splitlines()[before:]
    ours = [line for line in after if " herald: " in line or " herald." in line]
    assert len(ours) == 1 and "received SIGTERM while starting; stopped" in ours[0], after
    assert "Traceback" not in log and "error:" not in log
    assert "started on" not in log


@pytest.mark.parametrize("engine", ["kafka", "rabbitmq"])
def test_sigterm_while_connecting_to_an_unreachable_broker(tmp_path: Path, engine: str) -> None:
    """Both retry an unreachable broker for ``connect_timeout`` (30 s here)."""
    port = free_port()
    url = {
        "kafka": f"kafka://127.0.0.1:{port}?connect_timeout=30",
        "rabbitmq": f"amqp://guest:guest@127.0.0.1:{port}/?connect_timeout=30",
    }[engine]
    sigterm_while_starting(tmp_path, url, "", "t")


def test_sigterm_while_joining_a_kafka_group(tmp_path: Path) -> None:
    """Tansu holds a join for half the session timeout: 30 s here, well past the test."""
    require_server("kafka")
    t = topic()
    url = f"{BROKERS['kafka']}?session_timeout_ms=60000&rebalance_timeout_ms=60000"
    sigterm_while_starting(tmp_path, url, "joining group", t)  # topic() cleans up after


def test_sigterm_while_importing_the_app(tmp_path: Path) -> None:
    """Before the app runs (its module still importing), SIGTERM ends the worker cleanly too,
    rather than killing it with the signal."""
    (tmp_path / "slow_module.py").write_text(
        "import time\nprint('importing', flush=True)\ntime.sleep(30)\n"
        "from herald import App\napp = App('slow', broker='memory://')\n"
    )
    with herald_run("slow_module:app", tmp_path, tmp_path) as worker:
        worker.wait_for("importing")
        t0 = time.monotonic()
        rc = worker.stop(timeout=20)
        took = time.monotonic() - t0
    assert rc == 0, worker.stderr
    assert took < 5
    assert "slow_module:app: received SIGTERM while starting; stopped" in worker.stderr
    assert "Traceback" not in worker.stderr
