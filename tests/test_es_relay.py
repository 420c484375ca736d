"""Publishing what is stored: the relay forwards every stored event at least once, in order
per aggregate, even when the writer dies between the commit and the publish."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import anyio
import pytest

from herald import App, Context, Message
from herald.eventsourcing import EventStore, Repository
from herald.eventsourcing.causation import caused_by

from .conftest import wait_until
from .es_support import Account, database_url, drop_postgres, unique_prefix

pytestmark = pytest.mark.anyio
HERE = Path(__file__).resolve().parent


async def test_saved_events_are_published_with_stream_headers(tmp_path: Path) -> None:
    app = App("bank", broker="memory://")
    seen: list[Message] = []

    @app.subscriber("account", group="audit")
    async def audit(m: Message) -> None:
        seen.append(m)

    store = EventStore(f"sqlite:///{tmp_path / 'es.db'}")
    repo = Repository(Account, store, app=app)
    async with app:
        recs = await repo.update("acc-1", lambda a: (a.open("ada"), a.deposit(5)), create=True)
        cmd = app.message("commands", {"deposit": 7}, key="acc-1")
        with caused_by(Context(app, cmd, 1, "bank")):
            await repo.update("acc-1", lambda a: a.deposit(7))
        await wait_until(lambda: len(seen) == 3)
    assert recs.balance == 5
    assert [m.type for m in seen] == ["AccountOpened", "MoneyDeposited", "MoneyDeposited"]
    stored = await _read_all(store)
    assert [m.id for m in seen] == [r.id for r in stored]  # message id = stored event id
    for m, r in zip(seen, stored, strict=True):
        assert m.key == "acc-1"
        assert m.headers["stream_id"] == "acc-1"
        assert m.headers["stream_version"] == str(r.version)
        assert m.headers["stream_position"] == str(r.position)
        assert m.headers["schema_version"] == "1"
        assert m.headers["source"] == "bank"
    assert seen[2].headers["correlation_id"] == cmd.correlation_id
    assert seen[2].headers["causation_id"] == cmd.id
    assert seen[0].headers["correlation_id"] == seen[0].id  # a root event


async def _read_all(store: EventStore) -> list:  # type: ignore[type-arg]
    async with store:
        return await store.read_all(limit=10_000)


async def test_events_stored_before_the_app_started_are_published_at_start(
    tmp_path: Path,
) -> None:
    store = EventStore(f"sqlite:///{tmp_path / 'es.db'}")
    app = App("bank", broker="memory://")
    repo = Repository(Account, store, app=app)
    async with store:  # the app is not running: saved, not published yet
        await repo.update("a", lambda a: a.open("ada"), create=True)
    seen: list[str] = []

    @app.subscriber("account", group="audit")
    async def audit(m: Message) -> None:
        seen.append(m.type or "")

    async with app:
        await wait_until(lambda: seen == ["AccountOpened"])


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_sigkill_between_append_and_publish_loses_nothing(kind: str, tmp_path: Path) -> None:
    """A writer is SIGKILLed halfway through publishing a batch, with more events committed
    and never published. After a restart every stored event is on the bus; a consumer with the
    inbox handles each exactly once, in version order per aggregate."""
    broker = f"sqlite:///{tmp_path / 'broker.db'}"
    # on SQLite the store shares the broker's file
    store_url = broker if kind == "sqlite" else database_url(kind, tmp_path)
    prefix = unique_prefix()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent / "src")])}
    try:
        proc = subprocess.run(
            [sys.executable, str(HERE / "es_relay_child.py"), broker, store_url, prefix, "300"],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
        assert proc.returncode == -signal.SIGKILL, proc.stderr
        anyio.run(_restart_and_check, broker, store_url, prefix)
    finally:
        if kind == "postgres":
            drop_postgres(prefix)


async def _restart_and_check(broker: str, store_url: str, prefix: str) -> None:
    store = EventStore(store_url, prefix=prefix)
    async with store:
        stored = await store.read_all(limit=100_000)
        published_before = await store.backend.relay_position("relay")
    assert len(stored) > 300 and published_before < stored[-1].position
    app = App("bank", broker=broker)
    Repository(Account, store, app=app)  # the relay pumps what was not published when it starts
    handled: dict[str, list[int]] = defaultdict(list)
    handled_ids: list[str] = []
    raw: list[str] = []

    @app.subscriber("account", group="ledger", dedupe=True)
    async def ledger(m: Message) -> None:
        handled[m.headers["stream_id"]].append(int(m.headers["stream_version"]))
        handled_ids.append(m.id)

    @app.subscriber("account", group="raw")
    async def count_raw(m: Message) -> None:
        raw.append(m.id)

    async with app:
        await wait_until(lambda: len(handled_ids) >= len(stored), timeout=60)
        await wait_until(lambda: len(raw) > len(stored), timeout=30)
        await anyio.sleep(0.3)  # anything extra would show up now
    assert sorted(handled_ids) == sorted(r.id for r in stored)  # every event, exactly once
    by_stream: dict[str, list[int]] = defaultdict(list)
    for r in stored:
        by_stream[r.stream].append(r.version)
    assert dict(handled) == dict(by_stream)  # in version order per aggregate
    assert len(raw) > len(stored)  # the cut batch really was published twice
