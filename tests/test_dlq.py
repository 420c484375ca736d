"""Dead-letter tooling: list/show change nothing; replay reaches only the failing group."""

from __future__ import annotations

from pathlib import Path

import anyio
import pydantic
import pytest
from typer.testing import CliRunner

from herald import App, Retry, dead_letter_topic
from herald.cli import cli
from herald.dlq import DeadLetters

from .conftest import topic, wait_until

NO_RETRY = Retry(attempts=1, deliveries=1)


class Charge(pydantic.BaseModel):
    n: int


def make_app(
    url: str, t: str, broken: dict[str, bool], charged: list[int], audited: list[int]
) -> App:
    app = App("shop", broker=url, retry=NO_RETRY)

    @app.subscriber(t, group="billing")
    async def bill(e: Charge) -> None:
        if broken["on"]:
            raise ConnectionError(f"gateway down for {e.n}")
        charged.append(e.n)

    @app.subscriber(t, group="audit")
    async def audit(e: Charge) -> None:
        audited.append(e.n)

    return app


@pytest.mark.anyio
async def test_list_show_replay_purge(broker_url: str) -> None:
    t = topic()
    dlq_topic = dead_letter_topic(t, "billing")
    broken = {"on": True}
    charged: list[int] = []
    audited: list[int] = []
    app = make_app(broker_url, t, broken, charged, audited)
    async with app:
        ids = await app.publish_many(t, [Charge(n=i) for i in range(6)])
        await wait_until(lambda: app.consumers[0].stats.dead_lettered == 6 and len(audited) == 6)
        dlq = DeadLetters(app.transport, dlq_topic)

        first = await dlq.list()
        again = await dlq.list()
        assert sorted(m.headers["dlq.original_id"] for m in first) == sorted(ids)
        assert sorted(m.id for m in again) == sorted(m.id for m in first)  # peeking changed nothing
        assert len(await dlq.list(limit=2)) == 2

        shown = await dlq.show(ids[3])
        assert shown is not None
        assert shown.payload == b'{"n":3}'
        assert "gateway down for 3" in shown.headers["dlq.error"]
        assert await dlq.show("no-such-id") is None

        broken["on"] = False  # the gateway is back
        even = await dlq.replay(where=lambda m: m.payload in (b'{"n":0}', b'{"n":2}', b'{"n":4}'))
        assert even == 3
        await wait_until(lambda: sorted(charged) == [0, 2, 4])
        await anyio.sleep(0.3)
        assert sorted(audited) == list(range(6))  # audit handled them already: not again

        left = await dlq.list()
        assert sorted(m.payload for m in left) == [b'{"n":1}', b'{"n":3}', b'{"n":5}']
        assert await dlq.replay(limit=1) == 1
        await wait_until(lambda: len(charged) == 4)
        assert await dlq.purge() == 2
        assert await dlq.list() == []
    assert sorted(charged)[:1] == [0] and len(charged) == 4
    assert set(charged) - {0, 2, 4} <= {1, 3, 5}  # one of the odd ones was replayed


def test_cli_dlq_commands(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'shop.db'}"
    t = topic()
    dlq_topic = dead_letter_topic(t, "billing")
    charged: list[int] = []
    audited: list[int] = []

    async def fail_some() -> list[str]:
        app = make_app(url, t, {"on": True}, charged, audited)
        async with app:
            ids = await app.publish_many(t, [Charge(n=i) for i in range(3)])
            await wait_until(lambda: app.consumers[0].stats.dead_lettered == 3)
        return ids

    ids = anyio.run(fail_some)
    runner = CliRunner(env={"COLUMNS": "200"})  # wide enough that rich does not fold cells

    listed = runner.invoke(cli, ["dlq", "list", "--broker", url, dlq_topic])
    assert listed.exit_code == 0, listed.output
    assert "3 dead letter(s)" in listed.output
    assert ids[0][:8] in listed.output
    assert "ConnectionError" in listed.output

    shown = runner.invoke(cli, ["dlq", "show", "--broker", url, dlq_topic, ids[1]])
    assert shown.exit_code == 0, shown.output
    assert "gateway down for 1" in shown.output
    assert '{"n":1}' in shown.output
    missing = runner.invoke(cli, ["dlq", "show", "--broker", url, dlq_topic, "nope"])
    assert missing.exit_code == 1

    replayed = runner.invoke(cli, ["dlq", "replay", "--broker", url, dlq_topic, "--limit", "1"])
    assert replayed.exit_code == 0, replayed.output
    assert "replayed 1 dead letter(s)" in replayed.output

    refused = runner.invoke(cli, ["dlq", "purge", "--broker", url, dlq_topic], input="n\n")
    assert refused.exit_code == 1
    purged = runner.invoke(cli, ["dlq", "purge", "--broker", url, dlq_topic, "--yes"])
    assert purged.exit_code == 0, purged.output
    assert "purged 2 dead letter(s)" in purged.output

    bad = runner.invoke(cli, ["dlq", "list", "--broker", "nope://x", dlq_topic])
    assert bad.exit_code == 2
    assert "supported" in bad.output
