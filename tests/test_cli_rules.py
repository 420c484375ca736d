"""The CLI's rules: --broker or HERALD_BROKER (no default), --version, ``python -m herald``,
``dlq ... --json`` and whole ids, the dead-letter naming the tooling goes by."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import anyio
import msgspec
import pydantic
import pytest
from typer.testing import CliRunner

import herald
from herald import App, Retry, dead_letter_topic
from herald.cli import cli
from herald.dlq import DeadLetters, tool_group
from herald.middleware.deadletter import is_dead_letter_topic, skipped_topic
from herald.testing.helpers import make_messages
from herald.transports import open_transport, validate_name

from .conftest import BROKERS, require_server, topic, wait_until

ROOT = Path(__file__).resolve().parent.parent

#: every command that reads or writes messages, with its arguments other than --broker
BROKER_COMMANDS = [
    ["publish", "orders", "{}"],
    ["tail", "orders"],
    ["topics"],
    ["groups", "orders"],
    ["dlq", "list", "orders.billing.dlq"],
    ["dlq", "show", "orders.billing.dlq", "some-id"],
    ["dlq", "replay", "orders.billing.dlq"],
    ["dlq", "purge", "orders.billing.dlq", "--yes"],
]


@pytest.fixture
def runner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    monkeypatch.chdir(tmp_path)  # a database file created by mistake would show up here
    monkeypatch.delenv("HERALD_BROKER", raising=False)
    return CliRunner(env={"COLUMNS": "200"})


def test_version(runner: CliRunner) -> None:
    """``herald --version`` and ``python -m herald --version`` print the package's version,
    which is the one pyproject.toml declares."""
    result = runner.invoke(cli, ["--version"])
    assert result.exit_code == 0
    assert result.stdout == f"herald {herald.__version__}\n"
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert herald.__version__ == declared
    for args, expected in ((["--version"], f"herald {herald.__version__}\n"), (["--help"], "")):
        proc = subprocess.run(
            [sys.executable, "-m", "herald", *args],
            capture_output=True, text=True, timeout=60, cwd=ROOT,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == expected or (not expected and "Usage: herald " in proc.stdout)


@pytest.mark.parametrize("command", BROKER_COMMANDS, ids=lambda c: " ".join(c[:2]))
def test_broker_is_required(command: list[str], runner: CliRunner, tmp_path: Path) -> None:
    """Without --broker and HERALD_BROKER a command stops with exit 2 and says how to name
    one; it writes nothing (``herald publish`` used to write ./herald.db). Its --help states
    the rule."""
    result = runner.invoke(cli, command)
    assert result.exit_code == 2, result.output
    assert "no broker given: pass --broker URL or set HERALD_BROKER" in result.stderr
    assert list(tmp_path.iterdir()) == []
    help_text = runner.invoke(cli, [*command[:2], "--help"]).stdout
    words = " ".join(help_text.replace("│", " ").split())  # however rich wrapped it
    assert "Required: this option or $HERALD_BROKER; there is no default" in words


def test_broker_from_the_environment(runner: CliRunner, tmp_path: Path) -> None:
    """HERALD_BROKER stands in for --broker; --broker wins over it."""
    env_url = f"sqlite:///{tmp_path / 'env.db'}"
    flag_url = f"sqlite:///{tmp_path / 'flag.db'}"
    t = topic()
    sent = runner.invoke(cli, ["publish", t, '{"n": 1}'], env={"HERALD_BROKER": env_url})
    assert sent.exit_code == 0, sent.output
    other = runner.invoke(
        cli, ["publish", t, '{"n": 2}', "--broker", flag_url], env={"HERALD_BROKER": env_url}
    )
    assert other.exit_code == 0, other.output
    tail = ["tail", t, "--last", "5", "--count", "1", "--json"]
    shown = runner.invoke(cli, tail, env={"HERALD_BROKER": env_url})
    assert shown.exit_code == 0, shown.output
    [line] = shown.stdout.splitlines()
    assert json.loads(line)["payload"] == '{"n": 1}'
    assert json.loads(line)["id"] == sent.stdout.strip()
    shown = runner.invoke(cli, tail, env={"HERALD_BROKER": flag_url})
    assert json.loads(shown.stdout)["payload"] == '{"n": 2}'


class Charge(pydantic.BaseModel):
    n: int


def test_dlq_json_and_whole_ids(runner: CliRunner, tmp_path: Path) -> None:
    """``dlq list --json`` / ``dlq show --json`` print the letters for scripts; in the table an
    id is never wrapped or cut, however narrow the terminal, so a copied id works in
    ``dlq show``."""
    url = f"sqlite:///{tmp_path / 'shop.db'}"
    t = topic()
    letters = dead_letter_topic(t, "billing")

    async def fail_some() -> list[str]:
        app = App("shop", broker=url, retry=Retry(attempts=1, deliveries=1))

        @app.subscriber(t, group="billing")
        async def bill(e: Charge) -> None:
            raise ConnectionError(f"gateway down for {e.n}")

        async with app:
            ids = await app.publish_many(t, [Charge(n=i) for i in range(3)])
            await wait_until(lambda: app.consumers[0].stats.dead_lettered == 3)
        return ids

    ids = anyio.run(fail_some)
    listed = runner.invoke(cli, ["dlq", "list", letters, "--broker", url, "--json"])
    assert listed.exit_code == 0, listed.output
    rows = json.loads(listed.stdout)
    assert sorted(r["headers"]["dlq.original_id"] for r in rows) == sorted(ids)
    assert {r["payload"] for r in rows} == {'{"n":0}', '{"n":1}', '{"n":2}'}
    assert all(r["headers"]["dlq.reason"] == "retries exhausted" for r in rows)

    narrow = runner.invoke(cli, ["dlq", "list", letters, "--broker", url], env={"COLUMNS": "40"})
    assert narrow.exit_code == 0, narrow.output
    for mid in ids:
        assert mid in narrow.stdout  # whole, on one line
    copied = next(line for line in narrow.stdout.splitlines() if ids[1] in line)
    copied_id = next(word for word in copied.replace("│", " ").split() if word == ids[1])

    shown = runner.invoke(cli, ["dlq", "show", letters, copied_id, "--broker", url, "--json"])
    assert shown.exit_code == 0, shown.output
    letter = json.loads(shown.stdout)
    assert letter["headers"]["dlq.original_id"] == ids[1] and letter["payload"] == '{"n":1}'
    assert "gateway down for 1" in letter["headers"]["dlq.error"]

    table = runner.invoke(cli, ["dlq", "show", letters, ids[0], "--broker", url])
    assert table.exit_code == 0 and "gateway down for 0" in table.stdout


def test_dead_letter_naming() -> None:
    """What the tooling accepts as a dead-letter or skipped topic, and its group per topic."""
    assert is_dead_letter_topic(dead_letter_topic("orders", "billing"))
    assert is_dead_letter_topic(skipped_topic("orders.eu", "billing.v2"))
    for ordinary in ("orders", "orders.dlq", "dlq", "orders.billing", "orders.billing.dlqs"):
        assert not is_dead_letter_topic(ordinary)
    a, b = dead_letter_topic("a", "g"), dead_letter_topic("b", "g")
    assert tool_group(a) == tool_group(a) != tool_group(b)
    assert tool_group(a).startswith("herald.dlq.")
    validate_name("group", tool_group("x" * 200))
    assert len(f"{'x' * 200}.{tool_group('x' * 200)}.retry") < 249  # Kafka's topic name limit


@pytest.mark.anyio
async def test_kafka_dlq_tooling_has_a_group_per_topic() -> None:
    """On Kafka a group spans every topic it reads; the tooling reads each dead-letter topic
    in a consumer group of its own, and no application group."""
    require_server("kafka")
    url = BROKERS["kafka"]
    t = topic()
    first, second = dead_letter_topic(t, "billing"), dead_letter_topic(t, "audit")
    async with open_transport(url) as transport:
        for letters in (first, second):
            await transport.publish(letters, make_messages(letters, 2))
            async with DeadLetters(transport, letters) as dlq:
                assert len(await dlq.list()) == 2
        assert [g.name for g in await transport.list_groups(first)] == [tool_group(first)]
        assert [g.name for g in await transport.list_groups(second)] == [tool_group(second)]
        assert tool_group(first) != tool_group(second)


class Placed(msgspec.Struct):
    n: int


class Cancelled(msgspec.Struct):
    n: int


@pytest.mark.anyio
async def test_skipped_messages_are_replayed_to_their_group(sqlite_url: str) -> None:
    """A skipped topic is one the tooling works on: once the group has a handler for the type
    it skipped, a replay hands the skipped message to that group."""
    t = topic()
    skipped = skipped_topic(t, "orders")
    placed: list[int] = []
    cancelled: list[int] = []

    def app(handles_cancelled: bool) -> App:
        app = App("shop", broker=sqlite_url, unhandled="skip")

        @app.subscriber(t, group="orders")
        async def on_placed(e: Placed) -> None:
            placed.append(e.n)

        if handles_cancelled:

            @app.subscriber(t, group="orders")
            async def on_cancelled(e: Cancelled) -> None:
                cancelled.append(e.n)

        return app

    old = app(handles_cancelled=False)
    async with old, DeadLetters(old.transport, skipped) as dlq:
        await old.publish(t, Placed(n=1))
        await old.publish(t, Cancelled(n=2))
        await wait_until(lambda: placed == [1])
        with anyio.fail_after(10):
            while not (letters := await dlq.list()):
                await anyio.sleep(0.05)
        assert [m.headers["skipped.group"] for m in letters] == ["orders"]
    new = app(handles_cancelled=True)
    async with new, DeadLetters(new.transport, skipped) as dlq:
        assert await dlq.replay() == 1
        await wait_until(lambda: cancelled == [2])
        assert await dlq.list() == []
    assert placed == [1]


def test_every_command_is_registered(runner: CliRunner) -> None:
    """The sub-commands that live in their own modules are part of ``herald``."""
    out = runner.invoke(cli, ["--help"]).stdout
    for name in ("run", "publish", "tail", "topics", "groups", "dlq", "demo", "bench"):
        assert f" {name} " in out
