"""Graceful shutdown of a real worker process (`herald run`) on SIGTERM.

In-flight handlers finish and are acked; what was not started stays in the broker; a handler
still running after the grace period is cut off and its message is redelivered — never lost.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import anyio
import pytest

from herald import App

from .worker import checkout_env

SERVICE = textwrap.dedent(
    """
    import os, time
    from pathlib import Path
    import anyio
    from herald import App

    out = Path(os.environ["OUT_DIR"])
    app = App("svc", broker=os.environ["BROKER"],
              shutdown_timeout=float(os.environ["GRACE"]))

    @app.subscriber("jobs", group="workers")
    async def work(job: dict) -> None:
        (out / f"started-{job['n']}").touch()
        await anyio.sleep(float(os.environ["WORK_SECONDS"]))
        (out / f"done-{job['n']}").touch()
    """
)


def start_worker(tmp_path: Path, url: str, grace: float, work: float) -> subprocess.Popen[bytes]:
    (tmp_path / "svc_module.py").write_text(SERVICE)
    env = checkout_env(
        {
            "OUT_DIR": str(tmp_path),
            "BROKER": url,
            "GRACE": str(grace),
            "WORK_SECONDS": str(work),
        }
    )  # this checkout's herald, not whichever one the interpreter finds from tmp_path
    herald = Path(sys.executable).with_name("herald")
    return subprocess.Popen(
        [str(herald), "run", "svc_module:app"], cwd=tmp_path, env=env, stderr=subprocess.PIPE
    )


def wait_for(path: Path, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path.name} did not appear"
        time.sleep(0.02)


async def publish_jobs(url: str, n: int) -> None:
    async with App("producer", broker=url) as producer:
        await producer.publish_many("jobs", [{"n": i} for i in range(n)])


async def drain_jobs(url: str, expect: int) -> list[tuple[int, int]]:
    """Consume what is left in group 'workers': (job number, attempt) pairs."""
    got: list[tuple[int, int]] = []
    async with App("drainer", broker=url) as app:
        sub = await app.transport.subscribe("jobs", "workers")
        with anyio.move_on_after(8):
            while len(got) < expect:
                batch = await sub.fetch(100, 0.5)
                got += [
                    (int(d.message.payload.split(b":")[1].strip(b"}")), d.attempt) for d in batch
                ]
                await sub.ack(batch)
        extra = await sub.fetch(100, 0.5)  # nothing more may come
        got += [(-1, d.attempt) for d in extra]
        await sub.close()
    return got


def test_sigterm_finishes_in_flight_work_and_keeps_the_rest(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'broker.db'}"
    anyio.run(publish_jobs, url, 5)
    worker = start_worker(tmp_path, url, grace=30, work=1.0)
    try:
        wait_for(tmp_path / "started-0")
        worker.send_signal(signal.SIGTERM)
        _, stderr = worker.communicate(timeout=20)
    finally:
        worker.kill()
    assert worker.returncode == 0, stderr.decode()
    assert b"received SIGTERM" in stderr
    assert (tmp_path / "done-0").exists()  # the running handler was allowed to finish
    assert not (tmp_path / "started-1").exists()  # nothing new started after SIGTERM
    # job 0 was acked; jobs 1-4 are still there for the next worker
    remaining = anyio.run(drain_jobs, url, 4)
    assert sorted(n for n, _ in remaining) == [1, 2, 3, 4]


def test_grace_period_cuts_off_slow_handlers_and_their_messages_come_back(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'broker.db'}"
    anyio.run(publish_jobs, url, 1)
    worker = start_worker(tmp_path, url, grace=0.5, work=60)
    try:
        wait_for(tmp_path / "started-0")
        t0 = time.monotonic()
        worker.send_signal(signal.SIGTERM)
        _, stderr = worker.communicate(timeout=20)
        stopped_in = time.monotonic() - t0
    finally:
        worker.kill()
    assert worker.returncode == 0, stderr.decode()
    assert stopped_in < 10  # the grace period, not the 60 s handler
    assert b"still running after 0.5s" in stderr
    assert not (tmp_path / "done-0").exists()
    remaining = anyio.run(drain_jobs, url, 1)
    assert [n for n, _ in remaining] == [0]  # redelivered, not lost
    assert remaining[0][1] >= 2


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_idle_worker_stops_promptly(tmp_path: Path, sig: signal.Signals) -> None:
    url = f"sqlite:///{tmp_path / 'broker.db'}"
    worker = start_worker(tmp_path, url, grace=30, work=0)
    try:
        time.sleep(1.5)
        t0 = time.monotonic()
        worker.send_signal(sig)
        worker.communicate(timeout=20)
        assert time.monotonic() - t0 < 5
    finally:
        worker.kill()
    assert worker.returncode == 0
