"""Killed worker processes: unacked deliveries come back, acks stay final."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from typing import Any

import anyio
import pytest

from herald.testing.conformance.suite import Suite
from herald.testing.helpers import (
    connected,
    drain,
    expect_nothing,
    ids,
    make_messages,
    single,
    subscribed,
    unique_name,
)


class CrashTests(Suite):
    """Killed worker processes: unacked deliveries come back, acks stay final."""

    # -- 10. crash ---------------------------------------------------------------------------

    async def _kill_worker_mid_stream(self, broker_url: str) -> tuple[dict[str, Any], set[str]]:
        """Publish 30 messages; a worker process fetches 12, acks 4 and is SIGKILLed. Then
        drain the group on the redelivery URL until every message the worker did not ack was
        delivered; return the worker's report and the ids delivered after the kill."""
        url = self.redelivery_url(broker_url)
        async with connected(url) as transport:
            features = transport.features
            if not (features.cross_process and features.persistent):
                pytest.skip("needs features.cross_process and features.persistent")
            topic, group = unique_name("kill"), unique_name("g")
            published = make_messages(topic, 30)
            await self.create_groups(transport, topic, group)
            await transport.publish(topic, published)
            report = await _run_worker_until_report(url, topic, group, fetch=12, ack=4)
            assert len(report["fetched"]) == 12 and len(report["acked"]) == 4
            assert report["attempts"] == [1] * 12
            unacked = set(ids(published)) - set(report["acked"])
            async with subscribed(transport, topic, group) as sub:
                seen = await drain(
                    sub, unacked, timeout=self.redelivery_timeout + self.delivery_timeout
                )
                dupes = {k: len(v) for k, v in seen.items() if len(v) != 1}
                assert not dupes, f"delivered more than once after the kill: {dupes}"
                if self.counts_crash_redeliveries(url):
                    for mid in set(report["fetched"]) - set(report["acked"]):
                        attempt = single(seen, mid).attempt
                        assert attempt >= 2, "redelivery after a crash not counted"
                for mid in unacked - set(report["fetched"]):
                    assert single(seen, mid).attempt == 1
                late = await sub.fetch(100, self.quiet_period)
                await sub.ack(late)
        return report, set(seen) | {d.message.id for d in late}

    async def test_killed_worker_deliveries_come_back(self, broker_url: str) -> None:
        """A worker process fetches 12 messages, acks 4 and is killed with SIGKILL: the 8 it
        held unacked come back to the group with ``attempt >= 2``, the 18 it never fetched
        arrive at attempt 1, each exactly once."""
        await self._kill_worker_mid_stream(broker_url)

    async def test_acks_survive_a_killed_worker(self, broker_url: str) -> None:
        """An ``ack`` that returned is durable: after the acking worker process is killed with
        SIGKILL, the group never sees those messages again ("this group will not see them
        again")."""
        report, delivered = await self._kill_worker_mid_stream(broker_url)
        back = sorted(set(report["acked"]) & delivered)
        assert not back, f"{len(back)} of 4 messages acked before the kill were delivered again"

    async def test_ack_holds_while_consumer_idles(self, broker_url: str) -> None:
        """An ack is final even if the acking consumer then stays idle past the visibility
        timeout: member A fetches two messages, acks one and idles; member B receives the
        other once A's lease expires, but never the acked one. Runs when the subclass
        configures a short lease (``lease_query``)."""
        if not self.lease_query:
            pytest.skip("no short visibility timeout configured (lease_query)")
        async with connected(self.redelivery_url(broker_url)) as transport:
            topic, group = unique_name("idle"), unique_name("g")
            published = make_messages(topic, 2)
            await self.create_groups(transport, topic, group)
            await transport.publish(topic, published)
            async with subscribed(transport, topic, group) as a:
                held = await drain(a, ids(published), timeout=self.delivery_timeout, ack=False)
                x, y = (single(held, m.id) for m in published)
                await a.ack([x])
                async with subscribed(transport, topic, group) as b:
                    seen = await drain(
                        b, [y.message.id], timeout=self.redelivery_timeout, max_messages=10
                    )
                    assert x.message.id not in seen, "acked message went to another member"
                    assert single(seen, y.message.id).attempt == 2
                    await expect_nothing(b, self.quiet_period)


async def _run_worker_until_report(
    url: str, topic: str, group: str, *, fetch: int, ack: int
) -> dict[str, Any]:
    """Start the worker process, read its report line, then SIGKILL it and reap it."""
    cmd = [sys.executable, "-m", "herald.testing._worker", url, topic, group, str(fetch), str(ack)]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, encoding="utf-8"
    )
    try:
        assert proc.stdout is not None
        stdout = proc.stdout
        with anyio.fail_after(60):
            line = await anyio.to_thread.run_sync(stdout.readline, abandon_on_cancel=True)
        if not line:
            _, err = proc.communicate(timeout=10)
            raise AssertionError(f"worker exited with {proc.returncode} before reporting:\n{err}")
        report: dict[str, Any] = json.loads(line)
        assert "error" not in report, report
        return report
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
