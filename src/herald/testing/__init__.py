"""Testing aids for Herald: the transport conformance suite and its helpers.

The suite lives in :mod:`herald.testing.conformance`; a transport's test module subclasses
:class:`~herald.testing.conformance.TransportConformance` and provides a ``broker_url`` fixture.
"""

from __future__ import annotations

import sys

if "pytest" in sys.modules:  # pragma: no branch - only matters when running under pytest
    import pytest

    # Detailed assertion messages inside the importable suite, as in a test module.
    pytest.register_assert_rewrite("herald.testing.conformance")

__all__: list[str] = []
