"""Run the transport conformance suite against the built-in transports."""

from __future__ import annotations

from pathlib import Path

import pytest

from herald.testing.conformance import TransportConformance


class TestMemory(TransportConformance):
    """The in-process bus."""

    @pytest.fixture
    def broker_url(self) -> str:
        return "memory://"


class TestSqlite(TransportConformance):
    """The embedded SQLite broker; a 1 s visibility timeout for the crash tests."""

    lease_query = "visibility_timeout=1"

    @pytest.fixture
    def broker_url(self, tmp_path: Path) -> str:
        return f"sqlite:///{tmp_path}/c.db"
