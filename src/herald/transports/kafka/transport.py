"""Apache Kafka (and Kafka-protocol brokers): ``kafka://host:port[,host:port][?options]``.

Mapping: a Herald topic is a Kafka topic (created on demand with ``partitions`` partitions and
``replication`` replicas); a group on a topic is the Kafka consumer group ``<group>:<topic>``,
one per topic, so a join, a leave or a crash on one topic never stalls the group's other
topics (a Kafka group rebalances as a whole; :mod:`herald.transports.kafka.groups` gives the
reasons and how offsets committed under the bare group name by an older Herald are taken
over); the message key picks the partition, so order is kept per key. Wire format:
:mod:`herald.transports.kafka.wire`.

* Publishing: one idempotent producer (``enable_idempotence=True``) with ``acks=all``; a batch
  is built into one record batch per partition (keys hashed with murmur2, like every Kafka
  client; keyless records round-robin) and awaited together, so ``publish`` returns once every
  record is acknowledged by all in-sync replicas. A broker that refuses idempotence (InitProducerId
  fails, as Tansu 0.6 does with aiokafka's request version) gets a plain ``acks=all`` producer
  with one request in flight per partition, and a warning (``idempotence=auto``, the default;
  ``idempotence=true`` makes it an error instead).
* Consuming: see :mod:`herald.transports.kafka.member` (contiguous manual commits, never
  auto-commit; retry topics for ``nack``; handout counts in the commit metadata).
* Transactions: :meth:`Subscription.commit` (transactional subscribers) produces and commits
  the group's offsets in one Kafka transaction, see
  :mod:`herald.transports.kafka.transactions`; readers of what it produces should use
  ``isolation_level=read_committed``. Brokers without transactions (Tansu 0.6) refuse it at
  the subscriber's start.

URL options (query string):

=======================  =================================================================
``partitions``           partitions of topics Herald creates (default 4)
``replication``          their replication factor (default 1)
``client_id``            Kafka client id (default ``herald``)
``security_protocol``    ``PLAINTEXT`` (default), ``SSL``, ``SASL_PLAINTEXT``, ``SASL_SSL``
``sasl_mechanism``       ``PLAIN``, ``SCRAM-SHA-256``, ``SCRAM-SHA-512``; credentials are the
                         URL's ``user:password@`` (never logged: :attr:`url` redacts them)
``ssl_cafile``           CA bundle for ``SSL``/``SASL_SSL`` (default: system CAs)
``session_timeout_ms``   group session timeout (default 6000: the least Apache Kafka accepts by
                         default, group.min.session.timeout.ms; a dead member's partitions
                         move after 6 s, and brokers that hold a join for half a session, as
                         Tansu does, join in 3 s)
``heartbeat_interval_ms``  heartbeat interval (default 1000: rebalances are noticed fast)
``rebalance_timeout_ms``  how long a rebalance waits for members to rejoin (default 10000)
``max_request_size``     largest produce request in bytes (default 1048576)
``linger_ms``            producer linger (default 0)
``fetch_max``            records per fetch from the broker (default 500)
``connect_timeout``      the budget of ``connect()`` in seconds (default 10, the same on every
                         transport: :mod:`herald.transports.connecting`): an unreachable
                         broker is retried within it; a refused SASL login, a missing
                         authorization or a TLS mismatch raise ``PermanentTransportError``
                         at once
``join_timeout``         seconds to wait for a group assignment on subscribe (default 60)
``strict_attempts``      ``true``: commit the handout counts before ``fetch`` returns, so a
                         crash never hides a delivery from ``attempt`` (one more commit per
                         fetch); ``false`` (default): they travel with the next ack commit
                         (see :mod:`herald.transports.kafka.offsets`)
``idempotence``          ``auto`` (default), ``true``, ``false``
``isolation_level``      ``read_uncommitted`` (default) or ``read_committed``
=======================  =================================================================
"""

from __future__ import annotations

import itertools
import logging
import random
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, ClassVar

import anyio
from aiokafka import AIOKafkaProducer, TopicPartition  # type: ignore[import-untyped]
from aiokafka.admin import AIOKafkaAdminClient, NewTopic  # type: ignore[import-untyped]
from aiokafka.errors import (  # type: ignore[import-untyped]
    KafkaError,
    MessageSizeTooLargeError,
    TopicAlreadyExistsError,
    UnknownError,
)
from aiokafka.partitioner import murmur2  # type: ignore[import-untyped]

from herald.message import Message
from herald.transports.base import (
    Features,
    GroupInfo,
    PermanentTransportError,
    Start,
    Subscription,
    TopicInfo,
    Transport,
    TransportError,
    check_peek,
    check_topology,
    unsupported,
    validate_name,
)
from herald.transports.connecting import connect_within
from herald.transports.kafka import listing, peek
from herald.transports.kafka.connection import Access
from herald.transports.kafka.member import GroupMember
from herald.transports.kafka.options import parse_url
from herald.transports.kafka.subscription import KafkaSubscription
from herald.transports.kafka.transactions import KafkaTransactions
from herald.transports.kafka.wire import encode_headers, record_size, retry_topic

__all__ = ["KafkaTransport"]

log = logging.getLogger("herald.transports.kafka")


#: room left in a produce request for the record's framing and headers
_OVERHEAD = 8192


class KafkaTransport(Transport):
    """Kafka over aiokafka. Persistent and replayable as far as the broker keeps its log."""

    schemes: ClassVar[tuple[str, ...]] = ("kafka",)

    def __init__(self, url: str, hosts: list[str], options: dict[str, Any]) -> None:
        self._access = Access(url, hosts, options)  # takes the credentials out of options
        self._url = self._access.url
        self.options = options
        self.partitions: int = options["partitions"]
        self.replication: int = options["replication"]
        self.fetch_max: int = options["fetch_max"]
        self.join_timeout: float = options["join_timeout"]
        self.commit_timeout: float = options["commit_timeout"]
        self.strict_attempts: bool = options["strict_attempts"] == "true"
        self.max_request_size: int = options["max_request_size"]
        self.features = Features(
            persistent=True,
            cross_process=True,
            ordered_per_key=True,
            native_delay=True,
            replay=True,
            headers=True,
            max_payload=self.max_request_size - _OVERHEAD,
            transactions=True,  # where the broker grants them: commit([], []) tells at once
            listing=True,
        )
        self._producer: AIOKafkaProducer | None = None
        self._admin: AIOKafkaAdminClient | None = None
        self._known_topics: set[str] = set()
        self._topic_lock = anyio.Lock()
        self._members: dict[tuple[str, str], GroupMember] = {}
        self._member_locks: dict[tuple[str, str], anyio.Lock] = {}
        self._left: dict[tuple[str, str], dict[TopicPartition, tuple[int | None, str]]] = {}
        self.transactions = KafkaTransactions(self)
        self.idempotent = False
        # keyless records: round-robin over partitions from a random start per process
        self._round_robin = itertools.count(random.randrange(1 << 16))

    # -- URL ------------------------------------------------------------------------------

    @classmethod
    def from_url(cls, url: str) -> KafkaTransport:
        hosts, options = parse_url(url)
        return cls(url, hosts, options)

    @property
    def url(self) -> str:
        return self._url

    def _client_options(self) -> dict[str, Any]:
        return self._access.client_options()

    def consumer_options(self) -> dict[str, Any]:
        """aiokafka consumer keyword arguments shared by every group member."""
        o = self.options
        return {
            **self._client_options(),
            "session_timeout_ms": o["session_timeout_ms"],
            "heartbeat_interval_ms": o["heartbeat_interval_ms"],
            # how long the coordinator waits for members to rejoin in a rebalance; aiokafka's
            # default (max_poll_interval_ms, 5 min) would stall a group for minutes when a
            # member died mid-rebalance on brokers that do not expire it at session timeout
            "rebalance_timeout_ms": o["rebalance_timeout_ms"],
            "isolation_level": o["isolation_level"],
            "max_partition_fetch_bytes": max(1_048_576, self.max_request_size),
            "fetch_max_bytes": max(52_428_800, self.max_request_size),
        }

    # -- connection -------------------------------------------------------------------------

    async def connect(self) -> None:
        """Connect within ``connect_timeout`` (:mod:`herald.transports.connecting`): retry an
        unreachable broker, fail at once with :class:`PermanentTransportError` on a refused
        SASL login, a missing authorization or a TLS mismatch."""
        if self._producer is not None:
            return
        await connect_within(
            self._access.endpoint(),
            self.options["connect_timeout"],
            self._attempt,
            transient=(KafkaError,),
            quiet=["aiokafka"],
        )

    async def _attempt(self, _seconds: float) -> None:
        """One attempt of :meth:`connect`: the admin client and the producer."""
        try:
            await self._open_clients()
        except BaseException as e:
            with anyio.CancelScope(shield=True):
                await self._close_clients()
            if isinstance(e, Exception):
                raise self._access.classify(e) from None
            raise

    async def _open_clients(self) -> None:
        admin = AIOKafkaAdminClient(**self._client_options(), request_timeout_ms=10_000)
        self._admin = admin
        await admin.start()
        mode = self.options["idempotence"]
        if mode != "false":
            try:
                self._producer = await self.start_producer(idempotent=True)
                self.idempotent = True
                return
            except UnknownError as e:  # the broker's InitProducerId refused the request
                if mode == "true":
                    raise PermanentTransportError(
                        f"{self.url}: the broker refused an idempotent producer ({e!r})"
                    ) from None
                log.warning(
                    "%s: the broker refused an idempotent producer (%r); using acks=all "
                    "without idempotence (one request in flight per partition)",
                    self.url,
                    e,
                )
        self._producer = await self.start_producer(idempotent=False)
        self.idempotent = False

    async def start_producer(
        self, *, idempotent: bool, transactional_id: str | None = None
    ) -> AIOKafkaProducer:
        """A started producer with this transport's settings (acks=all)."""
        producer = AIOKafkaProducer(
            **self._client_options(),
            acks="all",
            enable_idempotence=idempotent,
            transactional_id=transactional_id,
            linger_ms=self.options["linger_ms"],
            max_request_size=self.max_request_size,
            max_batch_size=min(1_048_576, self.max_request_size),
            request_timeout_ms=30_000,
        )
        try:
            await producer.start()
        except BaseException:
            await producer.stop()
            raise
        return producer

    async def _close_clients(self) -> None:
        producer, self._producer = self._producer, None
        admin, self._admin = self._admin, None
        if producer is not None:
            try:
                await producer.stop()
            except KafkaError as e:
                log.warning("%s: error closing the producer: %r", self.url, e)
        if admin is not None:
            try:
                await admin.close()
            except KafkaError as e:
                log.warning("%s: error closing the admin client: %r", self.url, e)

    async def close(self) -> None:
        for member in list(self._members.values()):
            for sub in list(member.subs):
                await sub.close()
            await member.close()
        self._members.clear()
        await self.transactions.close()
        await self._close_clients()

    def _require(self) -> tuple[AIOKafkaProducer, AIOKafkaAdminClient]:
        if self._producer is None or self._admin is None:
            raise TransportError(f"{self.url} is not connected: call connect() or use 'async with'")
        return self._producer, self._admin

    # -- topics ---------------------------------------------------------------------------

    async def ensure_topics(self, *topics: str) -> None:
        """Create missing topics (``partitions``, ``replication`` from the URL)."""
        missing = [t for t in topics if t not in self._known_topics]
        if not missing:
            return
        _, admin = self._require()
        async with self._topic_lock:
            missing = [t for t in missing if t not in self._known_topics]
            if not missing:
                return
            existing = set(await admin.list_topics())
            new = [t for t in missing if t not in existing]
            if new:
                try:
                    await admin.create_topics(
                        [NewTopic(t, self.partitions, self.replication) for t in new]
                    )
                except TopicAlreadyExistsError:
                    pass  # created concurrently by another client
                except KafkaError as e:
                    raise TransportError(f"{self.url}: cannot create topics {new}: {e!r}") from e
            self._known_topics.update(missing)

    async def delete_topic(self, topic: str) -> None:
        """Delete ``topic`` and every ``<topic>.*`` topic hanging off it (retry topics,
        dead letters, skipped). Consumer groups are left to expire (Kafka drops the offsets
        of a deleted topic)."""
        validate_name("topic", topic)
        _, admin = self._require()
        names = [t for t in await admin.list_topics() if t == topic or t.startswith(topic + ".")]
        if names:
            try:
                await admin.delete_topics(names)
            except KafkaError as e:
                raise TransportError(f"{self.url}: cannot delete topics {names}: {e!r}") from e
        self._known_topics.difference_update(names)

    # -- read-only tooling ---------------------------------------------------------------

    def peek(
        self, topic: str, *, last: int = 0
    ) -> AbstractAsyncContextManager[AsyncIterator[Message]]:
        """A consumer with no group on every partition (see :mod:`herald.transports.kafka.peek`)."""
        check_peek(self, topic, last)
        self._require()
        return peek.peek(self, topic, last)

    async def list_topics(self) -> list[TopicInfo]:
        _, admin = self._require()
        try:
            return await listing.topics(admin)
        except KafkaError as e:
            raise TransportError(f"{self.url}: cannot list topics: {e!r}") from None

    async def list_groups(self, topic: str) -> list[GroupInfo]:
        validate_name("topic", topic)
        _, admin = self._require()
        try:
            return await listing.groups(admin, self.consumer_options(), topic)
        except KafkaError as e:
            raise TransportError(f"{self.url}: cannot list groups of {topic!r}: {e!r}") from None

    # -- publishing ---------------------------------------------------------------------------

    async def publish(self, topic: str, messages: Sequence[Message]) -> None:
        if topic not in self._known_topics:
            validate_name("topic", topic)
        if not messages:
            return
        await self.produce(topic, messages, ())

    async def produce(
        self, topic: str, messages: Sequence[Message], extra: Sequence[tuple[str, bytes]]
    ) -> None:
        """Send ``messages`` to ``topic`` with ``extra`` headers; return when all are acked."""
        producer, _ = self._require()
        self.check_sizes(messages)
        await self.ensure_topics(topic)
        try:
            futures = await self.send_batches(producer, topic, messages, extra)
            for fut in futures:
                await fut
        except MessageSizeTooLargeError as e:
            raise TransportError(f"{self.url}: message too large for {topic!r}: {e!r}") from e
        except KafkaError as e:
            raise TransportError(f"{self.url}: publish to {topic!r} failed: {e!r}") from e

    def check_sizes(self, messages: Sequence[Message]) -> None:
        """Raise :class:`TransportError` for a message over ``max_request_size``."""
        limit = self.max_request_size
        for m in messages:
            size = record_size(m)
            if size > limit:
                raise TransportError(
                    f"{self.url}: message {m.id} is about {size} bytes, over the Kafka "
                    f"max_request_size of {limit} bytes (payloads up to "
                    f"{self.features.max_payload} fit; raise max_request_size in the URL and "
                    "the broker's message.max.bytes for larger ones)"
                )

    async def send_batches(
        self,
        producer: AIOKafkaProducer,
        topic: str,
        messages: Sequence[Message],
        extra: Sequence[tuple[str, bytes]],
    ) -> list[Any]:
        """Queue ``messages`` as one record batch per partition (several if one fills up);
        return the batches' delivery futures.

        Building the batches here instead of calling ``producer.send`` per record saves a
        future, a partitioner call and an accumulator lookup per message (a third of the
        publishing CPU). Partitions are chosen as aiokafka's DefaultPartitioner (and the Java
        client) does for a key, murmur2 of the key bytes, so plain clients and Herald put a
        key on the same partition; keyless records go round-robin, which spreads them as
        evenly as the default's random choice."""
        partitions = sorted(await producer.partitions_for(topic))
        count = len(partitions)
        groups: dict[int, list[Message]] = {}
        rr = next(self._round_robin)
        for i, m in enumerate(messages):
            if m.key is None:
                p = partitions[(rr + i) % count]
            else:
                p = partitions[(murmur2(m.key.encode()) & 0x7FFFFFFF) % count]
            groups.setdefault(p, []).append(m)
        futures: list[Any] = []
        for p, group in groups.items():
            batch = producer.create_batch()
            for m in group:
                key = m.key.encode() if m.key is not None else None
                headers = encode_headers(m, extra)
                if batch.append(key=key, value=m.payload, timestamp=None, headers=headers) is None:
                    futures.append(await producer.send_batch(batch, topic, partition=p))
                    batch = producer.create_batch()
                    # an empty batch takes any record up to max_request_size (checked above)
                    batch.append(key=key, value=m.payload, timestamp=None, headers=headers)
            futures.append(await producer.send_batch(batch, topic, partition=p))
        return futures

    # -- subscribing --------------------------------------------------------------------------

    async def subscribe(
        self,
        topic: str,
        group: str,
        *,
        start: Start = "earliest",
        bind: Sequence[str] = (),
        source: str | None = None,
    ) -> Subscription:
        """Join ``group`` on ``topic`` (see the module docstring). ``bind`` and ``source``
        raise ``ValueError``: Kafka routes by partition, not by pattern, and the Herald topic
        is the Kafka topic of that name (Kafka names use the same characters), so a plain
        producer's records are consumed as they are."""
        validate_name("topic", topic)
        validate_name("group", group)
        bind, source = check_topology(bind, source)
        if bind:
            raise unsupported(
                "kafka", "bind", "Kafka routes records by partition, not by pattern; use filter="
            )
        if source is not None:
            raise unsupported(
                "kafka",
                "source",
                "the Herald topic is the Kafka topic of the same name, so name that topic",
            )
        if start not in ("earliest", "latest"):
            raise ValueError(f"start must be 'earliest' or 'latest', not {start!r}")
        self._require()
        key = (topic, group)
        lock = self._member_locks.setdefault(key, anyio.Lock())
        async with lock:
            member = self._members.get(key)
            if member is None or member.closed:
                await self.ensure_topics(topic, retry_topic(topic, group))
                member = GroupMember(self, topic, group, start)
                await member.open()
                self._members[key] = member
            sub = KafkaSubscription(member)
            member.subs.add(sub)
        return sub

    async def release(self, member: GroupMember, sub: Subscription, held: Sequence[Any]) -> None:
        """A local subscription of ``member`` closed holding ``held``: hand those to the other
        local subscriptions, or leave the group if it was the last."""
        key = (member.topic, member.group)
        lock = self._member_locks.setdefault(key, anyio.Lock())
        with anyio.CancelScope(shield=True):
            async with lock:
                if self._members.get(key) is not member:
                    return
                member.subs.discard(sub)
                if member.subs:
                    member.give_back(held)
                    return
                del self._members[key]
                await member.close()

    def remember_metadata(self, member: GroupMember) -> None:
        """Keep the commit metadata of a member leaving the group: if this transport joins the
        group again it still knows handout counts and out-of-order acks where the broker
        dropped the metadata (Tansu 0.6 does)."""
        self._left[(member.topic, member.group)] = {
            tp: (tr.committed, tr.metadata())
            for tp, tr in member.trackers.items()
            if tr.committed is not None
        }

    def recall_metadata(
        self, topic: str, group: str
    ) -> dict[TopicPartition, tuple[int | None, str]]:
        return self._left.get((topic, group), {})
