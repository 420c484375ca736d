"""The envelope: ids are UUIDv7, sortable and unique; timestamps are UTC RFC 3339."""

from __future__ import annotations

import re
import time
import uuid
from datetime import UTC, datetime

from herald.message import Message, new_id, new_ids, utc_now_rfc3339


def test_ids_are_uuid7_time_ordered_and_unique() -> None:
    ids = [new_id() for _ in range(3000)] + new_ids(5000) + [new_id()]
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)
    for i in (ids[0], ids[4000], ids[-1]):
        u = uuid.UUID(i)
        assert u.version == 7
        assert u.variant == uuid.RFC_4122
        assert str(u) == i  # canonical lowercase form


def test_id_embeds_creation_millisecond() -> None:
    before = time.time_ns() // 1_000_000
    ms = int(new_id().replace("-", "")[:12], 16)
    after = time.time_ns() // 1_000_000
    assert before <= ms <= after


def test_timestamp_is_utc_rfc3339_with_millis() -> None:
    ts = utc_now_rfc3339()
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", ts)
    parsed = datetime.fromisoformat(ts.replace("Z", "+00:00"))
    assert abs((datetime.now(UTC) - parsed).total_seconds()) < 2


def test_correlation_id_falls_back_to_own_id() -> None:
    m = Message(id="a", topic="t", payload=b"")
    assert m.correlation_id == "a"
    assert m.replace(headers={"correlation_id": "c"}).correlation_id == "c"
