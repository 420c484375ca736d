"""The transport conformance suite: one set of tests every Herald transport must pass.

Like Watermill's universal Pub/Sub tests, the suite is written against the contract in
:mod:`herald.transports.base` only. Tests branch on :class:`~herald.transports.Features` flags,
never on a transport's class. A transport's test module subclasses :class:`TransportConformance`
and provides the ``broker_url`` fixture::

    from herald.testing.conformance import TransportConformance

    class TestSqlite(TransportConformance):
        lease_query = "visibility_timeout=1"

        @pytest.fixture
        def broker_url(self, tmp_path):
            return f"sqlite:///{tmp_path}/c.db"

Every test uses fresh topic and group names (uuid suffix), so the suite can run against a shared
real server, and closes every subscription and transport it opens. Every wait is bounded, so no
test can hang: a message that does not arrive fails the test with the ids that are missing.

Knobs a subclass may override (class attributes):

* ``lease_query`` / :meth:`TransportConformance.redelivery_url` - how to ask the transport for a
  short visibility timeout (lease), used by the crash and cancellation tests.
* ``redelivery_timeout`` - how long a crashed consumer's deliveries may take to come back on the
  ``redelivery_url`` transport.
* ``delivery_timeout`` - upper bound for a published message to be delivered.
* ``quiet_period`` - how long a test waits to be sure nothing more is delivered.
* ``delay_tolerance`` - how early a ``nack(delay=...)`` redelivery may come.
"""

from herald.testing.conformance.crash import CrashTests
from herald.testing.conformance.delivery import DeliveryTests
from herald.testing.conformance.names import NameTests
from herald.testing.conformance.payloads import PayloadTests
from herald.testing.conformance.redelivery import RedeliveryTests
from herald.testing.helpers import (
    connected,
    drain,
    expect_nothing,
    make_messages,
    subscribed,
    unique_name,
)

__all__ = [
    "TransportConformance",
    "connected",
    "drain",
    "expect_nothing",
    "make_messages",
    "subscribed",
    "unique_name",
]


class TransportConformance(DeliveryTests, RedeliveryTests, CrashTests, PayloadTests, NameTests):
    """The universal transport test suite; subclass it and provide a ``broker_url`` fixture.

    Each test states the contract property it checks in its docstring. Tests that need a
    guarantee not every engine gives skip themselves based on ``transport.features``.
    """
