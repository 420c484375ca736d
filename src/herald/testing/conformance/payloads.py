"""Binary payloads, unicode headers and keys survive the round trip."""

from __future__ import annotations

import os

from herald.message import CORRELATION_ID, TRACEPARENT, Message, new_id
from herald.testing.conformance.suite import Suite
from herald.testing.helpers import (
    MiB,
    as_published,
    assert_exactly,
    drain,
    ids,
    single,
    subscribed,
    unique_name,
)
from herald.transports import Transport


class PayloadTests(Suite):
    """Binary payloads, unicode headers and keys survive the round trip."""

    # -- 11/12. payloads and headers ------------------------------------------------------------

    async def test_binary_payloads_round_trip(self, transport: Transport) -> None:
        """Empty, all-256-byte-values, invalid UTF-8, random and 1 MiB (or ``max_payload``)
        payloads arrive byte for byte, as ``bytes``."""
        topic, group = unique_name("payload"), unique_name("g")
        big = MiB
        if transport.features.max_payload is not None:
            big = min(big, transport.features.max_payload)
        payloads = [
            b"",
            bytes(range(256)),
            bytes(range(255, -1, -1)) * 4,
            b"\xff\xfe\xc3\x28\xa0\xa1\xe2\x28\xa1\x00\x80",
            b"\x00" * 100,
            os.urandom(4096),
            os.urandom(big),
        ]
        payloads = [p for p in payloads if len(p) <= big]
        await self.create_groups(transport, topic, group)
        published = [Message(id=new_id(), topic=topic, payload=p, type="bin") for p in payloads]
        for m in published:  # one per publish: each must fit the engine's limit alone
            await transport.publish(topic, [m])
        async with subscribed(transport, topic, group) as sub:
            seen = await drain(sub, ids(published), timeout=self.delivery_timeout, max_messages=2)
            assert_exactly(seen, ids(published))
            for m in published:
                got = single(seen, m.id).message
                assert type(got.payload) is bytes
                assert len(got.payload) == len(m.payload)
                assert got.payload == m.payload, f"payload of {len(m.payload)} bytes changed"

    async def test_unicode_headers_and_keys_round_trip(self, transport: Transport) -> None:
        """Header names and values with accents, Cyrillic, CJK and emoji, an empty value,
        and non-ASCII message keys and types arrive unchanged."""
        topic, group = unique_name("unicode"), unique_name("g")
        headers = {
            "naïve-ключ": "значение ✓",
            "emoji-🎉": "🚀🔥 done",
            "中文键": "日本語の値、한국어",
            "empty": "",
            "spaces and = ; :": "a=b; c:d, \"quoted\" 'single'",
            CORRELATION_ID: new_id(),
            TRACEPARENT: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        }
        published = [
            Message(
                id=new_id(),
                topic=topic,
                key="ключ-🔑-键",
                type="Bestellung.Aufgegeben.Ü",
                payload="ünïcødé payload 🎉".encode(),
                headers=headers,
            ),
            Message(id=new_id(), topic=topic, key="日本", payload=b"x", headers={"ä": "ö"}),
        ]
        await self.create_groups(transport, topic, group)
        await transport.publish(topic, published)
        async with subscribed(transport, topic, group) as sub:
            seen = await drain(sub, ids(published), timeout=self.delivery_timeout)
            assert_exactly(seen, ids(published))
            for m in published:
                got = single(seen, m.id).message
                assert got.headers == m.headers
                assert got.key == m.key
                assert got.type == m.type
                assert got == as_published(m, topic)
