"""The read-only tooling: tail, topics, groups and dlq list/show change nothing a group receives.

Each runs against the real server of every engine (``broker_url``) where it is supported, and
gives a clear one-line error where it is not. The CLI's own rules (the broker option,
``--version``, JSON output) are in ``test_cli_rules.py``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from typer.testing import CliRunner

from herald import dead_letter_topic
from herald.cli import cli
from herald.dlq import DeadLetters
from herald.message import Message
from herald.testing.helpers import make_messages, unique_name
from herald.transports import Transport, TransportError, open_transport

from .conftest import BROKERS, require_server, topic

RABBITMQ = BROKERS["rabbitmq"]
runner = CliRunner(env={"COLUMNS": "200"})


@pytest.fixture
def url(broker_url: str) -> str:
    """``broker_url``; memory:// as a named bus, so every transport of a test sees one bus."""
    return f"memory://{unique_name('bus')}" if broker_url == "memory://" else broker_url


def herald(*args: str) -> tuple[int, str, str]:
    """Run ``herald ARGS`` in this process (main thread); return exit code, stdout, stderr."""
    result = runner.invoke(cli, list(args))
    crash = result.exception
    if crash is not None and not isinstance(crash, SystemExit):  # name it in failures
        return result.exit_code, result.stdout, f"{result.stderr}{crash!r}"
    return result.exit_code, result.stdout, result.stderr


async def read(transport: Transport, t: str, group: str, n: int) -> list[bytes]:
    """Join ``group`` on ``t`` (from the earliest message) and read, ack and return ``n``."""
    sub = await transport.subscribe(t, group)
    got: list[bytes] = []
    try:
        with anyio.fail_after(30):
            while len(got) < n:
                batch = await sub.fetch(n - len(got), 0.5)
                await sub.ack(batch)
                got += [d.message.payload for d in batch]
    finally:
        await sub.close()
    return got


async def peeked(transport: Transport, t: str, last: int, publish: list[Message]) -> list[bytes]:
    """Peek at ``t`` with ``last``, publish ``publish`` meanwhile; the payloads seen."""
    want = (last if transport.features.replay else 0) + len(publish)
    seen: list[bytes] = []
    async with transport.peek(t, last=last if transport.features.replay else 0) as messages:
        await transport.publish(t, publish)
        with anyio.fail_after(30):
            async for m in messages:
                seen.append(m.payload)
                if len(seen) == want:
                    break
    return seen


@pytest.mark.anyio
async def test_dlq_tool_on_an_ordinary_rabbitmq_topic_takes_nothing() -> None:
    """Publish 4 to a topic no group has joined (RabbitMQ parks them for the first group), point
    the DLQ tool and the tail at it: both refuse, and the first real group still gets all 4
    (it got [] when the DLQ tool joined its group on the topic and took them over)."""
    require_server("rabbitmq")
    t = topic()
    async with open_transport(RABBITMQ) as transport:
        await transport.publish(t, make_messages(t, 4))
        with pytest.raises(ValueError, match="herald tail"):
            async with DeadLetters(transport, t) as dlq:
                await dlq.list()
        args = ("dlq", "list", t, "--broker", RABBITMQ)
        code, _, stderr = await anyio.to_thread.run_sync(herald, *args)
        assert code == 2 and "not a dead-letter topic" in stderr and "herald tail" in stderr
        with pytest.raises(TransportError, match="parked"):
            async with transport.peek(t):
                pass
        assert sorted(await read(transport, t, "billing", 4)) == [b"m-0", b"m-1", b"m-2", b"m-3"]


@pytest.mark.anyio
async def test_read_only_tools_change_nothing(url: str) -> None:
    """A group that exists and one that joins later (where the engine can replay) receive
    everything, whatever tail, topics, groups and dlq list/show did in between (through the
    API, and through the CLI where another process can see the broker)."""
    t = topic()
    early = make_messages(t, 4)
    during = make_messages(t, 2, prefix="d")
    async with open_transport(url) as transport:
        features = transport.features
        await (await transport.subscribe(t, "early")).close()  # the group exists, idle
        await transport.publish(t, early)

        seen = await peeked(transport, t, 2, during)
        assert seen == ([b"m-2", b"m-3"] if features.replay else []) + [b"d-0", b"d-1"]
        with pytest.raises(ValueError, match="herald tail"):
            DeadLetters(transport, t)
        async with DeadLetters(transport, dead_letter_topic(t, "early")) as dlq:
            assert await dlq.list() == []
            assert await dlq.show(early[0].id) is None
        if features.listing:
            assert t in [x.name for x in await transport.list_topics()]
            assert [g.name for g in await transport.list_groups(t)] == ["early"]

        if features.cross_process:
            await anyio.to_thread.run_sync(cli_tools, url, t, features.replay, features.listing)

        everything = sorted(m.payload for m in early + during)
        assert sorted(await read(transport, t, "early", 6)) == everything
        if features.replay:
            assert sorted(await read(transport, t, "late", 6)) == everything
        if features.listing:
            names = [g.name for g in await transport.list_groups(t)]
            assert names == (["early", "late"] if features.replay else ["early"])  # no tool's


def cli_tools(url: str, t: str, replay: bool, listing: bool) -> None:
    """The read-only commands on ``t``, each checked for its exit code."""
    if replay:
        code, out, err = herald("tail", t, "--broker", url, "--last", "3", "--count", "3", "--json")
        assert code == 0, err
        assert [json.loads(line)["payload"] for line in out.splitlines()] == ["m-3", "d-0", "d-1"]
    for args in (["topics"], ["groups", t]):
        code, _, err = herald(*args, "--broker", url)
        assert code == (0 if listing else 1), err
    code, _, err = herald("dlq", "list", t, "--broker", url)
    assert code == 2 and "herald tail" in err
    letters = dead_letter_topic(t, "early")
    code, _, err = herald("dlq", "list", letters, "--broker", url)
    assert code == 0, err
    code, _, err = herald("dlq", "show", letters, "no-such-id", "--broker", url)
    assert code == 1 and "no dead letter" in err


@pytest.mark.anyio
async def test_topics_and_groups(url: str) -> None:
    """``list_topics`` (``herald topics``) has the topic and its dead-letter topic, not helper
    objects (retry topics); ``list_groups`` (``herald groups``) each group's lag. Engines that
    cannot list say so in one line."""
    t = topic()
    letters = dead_letter_topic(t, "billing")
    async with open_transport(url) as transport:
        features = transport.features
        await (await transport.subscribe(t, "billing")).close()
        await transport.publish(t, make_messages(t, 3))
        await (await transport.subscribe(letters, "audit")).close()
        await transport.publish(letters, make_messages(letters, 1))
        if features.listing:
            names = {x.name: x.messages for x in await transport.list_topics()}
            assert names[t] in (3, None) and letters in names
            assert not [n for n in names if n.startswith(t) and n.endswith(".retry")]
            [group] = await transport.list_groups(t)
            assert group.name == "billing" and group.lag == 3
            assert await transport.list_groups(unique_name("none")) == []
        else:
            with pytest.raises(TransportError, match="cannot list topics"):
                await transport.list_topics()
            with pytest.raises(TransportError, match="cannot list groups"):
                await transport.list_groups(t)
    if features.cross_process:
        await anyio.to_thread.run_sync(cli_listing, url, t, features.listing)


def cli_listing(url: str, t: str, listing: bool) -> None:
    code, out, err = herald("topics", "--broker", url, "--json")
    if not listing:
        assert code == 1 and "cannot list topics" in err and "Traceback" not in err
        code, out, err = herald("groups", t, "--broker", url)
        assert code == 1 and "cannot list groups" in err and len(err.strip().splitlines()) == 1
        return
    assert code == 0, err
    assert t in [x["name"] for x in json.loads(out)]
    code, out, err = herald("groups", t, "--broker", url, "--json")
    assert code == 0, err
    [group] = json.loads(out)
    assert group["name"] == "billing" and group["lag"] == 3
    code, out, err = herald("groups", t, "--broker", url)
    assert code == 0 and "billing" in out and "1 group(s)" in out, err


@pytest.fixture
def tail_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    yield {**os.environ, "PYTHONIOENCODING": "utf-8", "COLUMNS": "200", "HOME": str(tmp_path)}


def test_tail_prints_what_arrives(url: str, tail_env: dict[str, str]) -> None:
    """``herald tail`` in a process of its own: once it says it is tailing, what is published
    is printed, as JSON lines with --json; SIGINT stops it cleanly; a group still gets it all."""
    if not open_transport(url).features.cross_process:
        pytest.skip("another process cannot see this broker")
    t = topic()
    sent = make_messages(t, 3)

    async def prepare() -> None:
        async with open_transport(url) as transport:  # the topic exists, with a group
            await (await transport.subscribe(t, "early")).close()

    async def publish(messages: list[Message]) -> None:
        async with open_transport(url) as transport:
            await transport.publish(t, messages)

    anyio.run(prepare)
    cmd = [sys.executable, "-m", "herald", "tail", t, "--broker", url, "--json"]
    with subprocess.Popen(
        cmd, env=tail_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as proc:
        watchdog = threading.Timer(90, proc.kill)  # a hung tail fails the test, not the run
        watchdog.start()
        try:
            assert proc.stderr is not None and proc.stdout is not None
            seen = [proc.stderr.readline()]
            while seen[-1] and not seen[-1].startswith(f"tailing {t} on "):
                seen.append(proc.stderr.readline())  # library warnings may come first
            assert seen[-1], "".join(seen)
            anyio.run(publish, sent)
            lines = [proc.stdout.readline() for _ in sent]
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=30) == 0, proc.stderr.read()
        finally:
            watchdog.cancel()
            if proc.poll() is None:
                proc.kill()
    printed = [json.loads(line) for line in lines]
    assert [p["id"] for p in printed] == [m.id for m in sent]
    assert [p["payload"] for p in printed] == ["m-0", "m-1", "m-2"]
    assert printed[0]["headers"] == {"seq": "0"} and printed[0]["type"] == "conformance.Event"

    async def check() -> None:
        async with open_transport(url) as transport:
            assert sorted(await read(transport, t, "early", 3)) == [b"m-0", b"m-1", b"m-2"]

    anyio.run(check)


def test_tail_errors(url: str) -> None:
    """--last where the engine keeps no history, and a topic that does not exist where the
    engine cannot wait for it without creating it: exit 1, one line, no traceback."""
    transport = open_transport(url)
    if not transport.features.replay:
        code, _, err = herald("tail", topic(), "--broker", url, "--last", "5")
        assert code == 1 and "cannot replay" in err and len(err.strip().splitlines()) == 1
    code, _, err = herald("tail", "no..such", "--broker", url, "--last", "-1")
    assert code == 2


@pytest.mark.anyio
async def test_rabbitmq_peek_leaves_no_queue() -> None:
    """The peek's exclusive queue is bound while it runs and gone once it ends."""
    require_server("rabbitmq")
    t = topic()

    def bindings() -> list[str]:
        out = subprocess.run(
            ["rabbitmqctl", "-q", "list_bindings", "source_name", "destination_name"],
            capture_output=True, text=True, timeout=60, check=True,
        ).stdout  # fmt: skip
        return [line.split("\t")[1] for line in out.splitlines() if line.startswith(f"{t}\t")]

    async with open_transport(RABBITMQ) as transport:
        await (await transport.subscribe(t, "g")).close()
        async with transport.peek(t):
            during = await anyio.to_thread.run_sync(bindings)
        after = await anyio.to_thread.run_sync(bindings)
    assert sorted(during) == sorted([f"{t}:g", *[q for q in during if q.startswith("amq.gen-")]])
    assert len([q for q in during if q.startswith("amq.gen-")]) == 1
    assert after == [f"{t}:g"]


@pytest.mark.anyio
async def test_nats_peek_leaves_no_consumer() -> None:
    """The peek's ephemeral consumer exists while it runs and is deleted when it ends."""
    require_server("nats")
    t = topic()
    async with open_transport(BROKERS["nats"]) as transport:
        await (await transport.subscribe(t, "g")).close()
        jsm = transport._jsm  # type: ignore[attr-defined]
        stream = t.replace(".", "~")
        async with transport.peek(t):
            during = [c.name for c in await jsm.consumers_info(stream)]
        after = [c.name for c in await jsm.consumers_info(stream)]
    assert len(during) == 2 and "g" in during
    assert after == ["g"]
