"""Kafka transactions behind :meth:`Subscription.commit`: consume-transform-produce, atomically.

One transactional producer per transport, started on first use with a fresh
``transactional.id`` (``<client_id>-<random hex>``); transactions are serialised on it. A
commit begins a transaction, produces the messages (the same record batches and partitioning
as a plain publish), adds the group's new offsets with their commit metadata
(AddOffsetsToTxn / TxnOffsetCommit) and commits. If any step fails the transaction is
aborted: consumers reading with ``isolation_level=read_committed`` never see its messages,
and the group's committed offsets stay where they were, so the deliveries come back.

Limits, as with aiokafka's API: the offsets are sent by group id, without the member's
generation (pre-KIP-447), and each process uses a new ``transactional.id``. A member that
lost a partition in a rebalance while its transaction was open can therefore still commit it,
and the partition's new owner handles those messages again: exactly once within a stable
group, at-least-once across such a rebalance. Consumers of the produced topics must read
with ``isolation_level=read_committed`` to skip aborted messages.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import anyio
from aiokafka import AIOKafkaProducer, TopicPartition  # type: ignore[import-untyped]
from aiokafka.errors import KafkaError  # type: ignore[import-untyped]
from aiokafka.structs import OffsetAndMetadata  # type: ignore[import-untyped]

from herald.message import Message
from herald.transports.base import TransportError

__all__ = ["KafkaTransactions", "Owner"]

log = logging.getLogger("herald.transports.kafka")


class Owner(Protocol):
    """What the transactional producer uses of its transport. The transport module imports
    this one, so this one names these members instead of importing the transport class."""

    @property
    def url(self) -> str: ...

    @property
    def options(self) -> dict[str, Any]:
        """The parsed URL options (``client_id`` names the transactional producers)."""
        ...

    async def start_producer(
        self, *, idempotent: bool, transactional_id: str | None = None
    ) -> AIOKafkaProducer: ...

    async def ensure_topics(self, *topics: str) -> None: ...

    def check_sizes(self, messages: Sequence[Message]) -> None: ...

    async def send_batches(
        self,
        producer: AIOKafkaProducer,
        topic: str,
        messages: Sequence[Message],
        extra: Sequence[tuple[str, bytes]],
    ) -> list[Any]:
        """Queue ``messages`` on ``producer``; return the batches' delivery futures."""
        ...


class KafkaTransactions:
    """The transport's transactional producer and the one-transaction-at-a-time discipline."""

    def __init__(self, transport: Owner) -> None:
        self._t = transport
        self._producer: AIOKafkaProducer | None = None
        self._lock = anyio.Lock()

    async def run(
        self,
        batches: Mapping[str, list[Message]],
        offsets: dict[TopicPartition, OffsetAndMetadata],
        group: str,
    ) -> None:
        """Produce ``batches`` and commit ``offsets`` for ``group`` in one transaction.
        With neither, only make sure the broker grants a transactional producer."""
        t = self._t
        for batch in batches.values():
            t.check_sizes(batch)
        async with self._lock:
            producer = await self._started()
            if not batches and not offsets:
                return
            await t.ensure_topics(*batches)
            try:
                await producer.begin_transaction()
                futures: list[Any] = []
                for topic, batch in batches.items():
                    futures += await t.send_batches(producer, topic, batch, ())
                for fut in futures:
                    await fut
                if offsets:
                    await producer.send_offsets_to_transaction(offsets, group)
                await producer.commit_transaction()
            except BaseException as e:
                with anyio.CancelScope(shield=True):
                    await self._abort(producer)
                if isinstance(e, KafkaError):
                    raise TransportError(
                        f"{t.url}: transaction for group {group!r} aborted: {e!r}"
                    ) from e
                raise

    async def _started(self) -> AIOKafkaProducer:
        if self._producer is not None:
            return self._producer
        t = self._t
        txn_id = f"{t.options['client_id']}-{secrets.token_hex(8)}"
        try:
            self._producer = await t.start_producer(idempotent=True, transactional_id=txn_id)
        except KafkaError as e:
            raise TransportError(
                f"{t.url}: the broker refused a transactional producer ({e!r}); "
                "transactional subscribers need a broker with transactions"
            ) from e
        return self._producer

    async def _abort(self, producer: AIOKafkaProducer) -> None:
        try:
            await producer.abort_transaction()
        except Exception as e:  # a fatal producer state: start a fresh producer next time
            log.warning("%s: aborting a transaction failed (%r); new producer", self._t.url, e)
            await self.close()

    async def close(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            try:
                await producer.stop()
            except KafkaError as e:
                log.warning("%s: error closing the transactional producer: %r", self._t.url, e)
