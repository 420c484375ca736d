"""Chaos: nothing is lost and every good message takes effect exactly once.

20,000 messages on the SQLite broker, 3 worker processes (`herald run`), 5 % of handler calls
raise (after writing, so the write must roll back), 1 % of messages are poison (undecodable),
and one worker is killed with SIGKILL twice and restarted. The handler records its effect in
the same transaction as the inbox record (``Dedupe(transactional=True)``). At the end every
good message has exactly one effect row, every poison message is in the dead letters with its
reason, and nothing else is there. Bounded in time; prints a summary.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import anyio
import pytest

from herald import App, Message, dead_letter_topic
from herald.message import new_id

TOTAL = 20_000
POISON_EVERY = 100  # 1 %
TOPIC = "chaos.orders"
GROUP = "fulfil"
DEADLINE = 240.0

SERVICE = textwrap.dedent(
    """
    import os, random
    import msgspec
    from herald import App, Context, Retry
    from herald.inbox.sqlite import SqliteInbox
    from herald.middleware.dedupe import Dedupe

    class Item(msgspec.Struct):
        n: int

    rng = random.Random(os.getpid())
    inbox = SqliteInbox(os.environ["EFFECTS"])
    app = App(
        "chaos",
        broker=os.environ["BROKER"],
        retry=Retry(attempts=3, delay=0.001, deliveries=10, redelivery_delay=0.05),
    )

    @app.subscriber("chaos.orders", group="fulfil", dedupe=Dedupe(inbox, transactional=True))
    async def fulfil(item: Item, ctx: Context) -> None:
        ctx.transaction.execute(
            "INSERT INTO effects(n, msg_id, pid) VALUES (?, ?, ?)",
            (item.n, ctx.message.id, os.getpid()),
        )
        if rng.random() < 0.05:
            raise RuntimeError("chaos: transient failure after writing")
    """
)


def start_worker(tmp: Path, broker: str, effects: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "BROKER": broker, "EFFECTS": str(effects)}
    herald = Path(sys.executable).with_name("herald")
    return subprocess.Popen(
        [str(herald), "run", "chaos_service:app", "--log-level", "ERROR"],
        cwd=tmp,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def effect_count(effects: Path) -> int:
    with sqlite3.connect(effects, timeout=30) as db:
        return int(db.execute("SELECT COUNT(DISTINCT n) FROM effects").fetchone()[0])


async def publish_all(broker: str) -> tuple[set[int], set[str]]:
    good: set[int] = set()
    poison: set[str] = set()
    async with App("producer", broker=broker) as producer:
        for start in range(0, TOTAL, 1000):
            batch: list[Message] = []
            for i in range(start, start + 1000):
                if i % POISON_EVERY == 0:
                    m = Message(id=new_id(), topic=TOPIC, payload=b"\x00poison", type="Item")
                    poison.add(m.id)
                else:
                    m = producer.message(TOPIC, {"n": i}, type="Item", key=str(i % 64))
                    good.add(i)
                batch.append(m)
            await producer.transport.publish(TOPIC, batch)
    return good, poison


async def read_dead_letters(broker: str, expect: int) -> dict[str, str]:
    out: dict[str, str] = {}
    async with App("checker", broker=broker) as app:
        sub = await app.transport.subscribe(dead_letter_topic(TOPIC, GROUP), "check")
        with anyio.move_on_after(30):
            while len(out) < expect:
                batch = await sub.fetch(500, 1.0)
                for d in batch:
                    out[d.message.headers["dlq.original_id"]] = d.message.headers["dlq.reason"]
                await sub.ack(batch)
        await sub.close()
    return out


@pytest.mark.slow
def test_chaos_exactly_once_in_effect(tmp_path: Path) -> None:
    broker = f"sqlite:///{tmp_path / 'broker.db'}?visibility_timeout=2"
    effects = tmp_path / "effects.db"
    with sqlite3.connect(effects) as db:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("CREATE TABLE effects (n INTEGER NOT NULL, msg_id TEXT, pid INTEGER)")
    (tmp_path / "chaos_service.py").write_text(SERVICE)

    t0 = time.monotonic()
    good, poison = anyio.run(publish_all, broker)
    workers = [start_worker(tmp_path, broker, effects) for _ in range(3)]
    kills = 0
    try:
        for threshold in (TOTAL * 15 // 100, TOTAL * 45 // 100):  # two kills, mid-stream
            while effect_count(effects) < threshold:
                assert time.monotonic() - t0 < DEADLINE, "workers stalled before the kill"
                assert all(w.poll() is None for w in workers), "a worker died by itself"
                time.sleep(0.2)
            workers[0].send_signal(signal.SIGKILL)
            workers[0].wait(timeout=10)
            kills += 1
            workers[0] = start_worker(tmp_path, broker, effects)
        while effect_count(effects) < len(good):
            assert time.monotonic() - t0 < DEADLINE, (
                f"only {effect_count(effects)} of {len(good)} good messages took effect"
            )
            time.sleep(0.25)
    finally:
        for w in workers:
            w.send_signal(signal.SIGTERM)
        for w in workers:
            try:
                w.wait(timeout=40)
            except subprocess.TimeoutExpired:
                w.kill()
    elapsed = time.monotonic() - t0

    letters = anyio.run(read_dead_letters, broker, len(poison))
    with sqlite3.connect(effects) as db:
        rows = db.execute("SELECT n, COUNT(*) FROM effects GROUP BY n").fetchall()
        by_pid = db.execute("SELECT pid, COUNT(*) FROM effects GROUP BY pid").fetchall()
        inbox_rows = db.execute("SELECT COUNT(*) FROM herald_inbox").fetchone()[0]
    duplicates = {n: c for n, c in rows if c != 1}
    print(
        f"\nchaos summary: {TOTAL} messages ({len(good)} good, {len(poison)} poison), "
        f"3 workers, {kills} SIGKILLs, {elapsed:.1f}s; effects {len(rows)} "
        f"(duplicated: {len(duplicates)}), inbox records {inbox_rows}, "
        f"dead letters {len(letters)}; effects per worker pid: {sorted(c for _, c in by_pid)}"
    )
    assert kills == 2
    assert duplicates == {}
    assert {n for n, _ in rows} == good
    assert set(letters) == poison
    assert set(letters.values()) == {"undecodable payload"}
    assert len(by_pid) >= 4  # work was shared, including by the restarted workers
