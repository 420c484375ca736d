"""The transport conformance suite against Redis Streams (the server of ../shared/services.md).

Everything the suite creates on the shared server is deleted after each test.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import anyio
import pytest
import redis.asyncio as aioredis

from herald.testing import helpers
from herald.testing.conformance import TransportConformance
from herald.testing.servers import require_server

REDIS_URL = "redis://127.0.0.1:6379/0"


class TestRedis(TransportConformance):
    """Redis Streams; a 1 s visibility timeout (and a 0.2 s claim interval) for the crash and
    cancellation tests."""

    lease_query = "visibility_timeout=1&claim_interval=0.2"

    @pytest.fixture
    def broker_url(self) -> str:
        require_server("redis")
        return REDIS_URL

    @pytest.fixture(autouse=True)
    def _delete_created_keys(self, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
        """The suite's topic and group names all contain a fresh uuid's hex: record them, then
        remove every key containing one (streams, delayed sets, retry streams, registries)."""
        made: list[str] = []
        original = uuid.uuid4

        def recording() -> uuid.UUID:
            u = original()
            made.append(u.hex[:16])
            return u

        monkeypatch.setattr(helpers.uuid, "uuid4", recording)
        yield
        monkeypatch.undo()

        async def cleanup() -> None:
            client = aioredis.Redis(host="127.0.0.1", port=6379, db=0)
            try:
                for part in made:
                    keys = [k async for k in client.scan_iter(match=f"*{part}*", count=1000)]
                    if keys:
                        await client.unlink(*keys)
            finally:
                await client.aclose()

        anyio.run(cleanup)
