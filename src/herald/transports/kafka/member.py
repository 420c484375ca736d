"""The consuming side of the Kafka transport: one Kafka group member per (topic, group).

A transport opens one :class:`aiokafka.AIOKafkaConsumer` per (topic, group) it subscribes to,
shared by every local subscription of that pair
(:class:`~herald.transports.kafka.subscription.KafkaSubscription`): local subscriptions compete
for the member's records in memory (no rebalance per local subscriber), and the member leaves the
Kafka group when the last local subscription closes. The member consumes the topic and the
group's retry topic ``<topic>.<group>.retry`` together, in the Kafka consumer group
``<group>:<topic>`` (one per topic: :mod:`herald.transports.kafka.groups` says why).

Commits never skip: each assigned partition has a
:class:`~herald.transports.kafka.offsets.PartitionTracker`; acks move its committed offset over
the contiguous acked prefix only, and commits are serialised and coalesced (one OffsetCommit
request covers every partition that changed). Partitions being revoked in a rebalance get what
is acked committed first; a partition assigned back to us in the same rebalance keeps its state
and in-flight deliveries (we seek to where we had fetched, so nothing is re-read).

``nack(delay)`` produces a copy of the message to the retry topic with ``herald.attempt`` and
``herald.due_at`` headers and, once that copy is durable, acks the original: a failing message
never holds up its partition. Retry records that are not due yet wait in a local heap, their
offsets uncommitted, so a restart re-reads them and still honours ``due_at``.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import time
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import anyio
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition  # type: ignore[import-untyped]
from aiokafka.abc import ConsumerRebalanceListener  # type: ignore[import-untyped]
from aiokafka.errors import (  # type: ignore[import-untyped]
    CommitFailedError,
    IllegalStateError,
    KafkaError,
    RebalanceInProgressError,
)
from aiokafka.structs import OffsetAndMetadata  # type: ignore[import-untyped]

from herald.message import Message
from herald.transports.base import Delivery, Start, Subscription, TransportError, by_topic
from herald.transports.kafka.groups import (
    abandon_join,
    committed_offsets,
    group_id,
    legacy_offsets,
)
from herald.transports.kafka.offsets import OffsetToken, PartitionTracker
from herald.transports.kafka.transactions import KafkaTransactions
from herald.transports.kafka.wire import (
    ATTEMPT_HEADER,
    DUE_AT_HEADER,
    decode_record,
    due_at_ms,
    retry_topic,
)

__all__ = ["GroupMember", "Owner"]

log = logging.getLogger("herald.transports.kafka")

_tiebreak = itertools.count()
#: retry records not yet due above which the retry partitions are paused (memory bound)
_MAX_DELAYED = 10_000


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, member: GroupMember) -> None:
        self._member = member

    async def on_partitions_revoked(self, revoked: Any) -> None:
        await self._member.on_revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: Any) -> None:
        await self._member.on_assigned(set(assigned))


class Owner(Protocol):
    """What a group member (and its local subscriptions) use of the transport. The transport
    module imports this one, so this one names these members instead of the class."""

    fetch_max: int
    join_timeout: float
    commit_timeout: float
    strict_attempts: bool
    transactions: KafkaTransactions

    @property
    def url(self) -> str: ...

    def consumer_options(self) -> dict[str, Any]: ...

    async def produce(
        self, topic: str, messages: Sequence[Message], extra: Sequence[tuple[str, bytes]]
    ) -> None: ...

    async def release(
        self, member: GroupMember, sub: Subscription, held: Sequence[Any]
    ) -> None: ...

    def remember_metadata(self, member: GroupMember) -> None: ...

    def recall_metadata(
        self, topic: str, group: str
    ) -> dict[TopicPartition, tuple[int | None, str]]: ...


class GroupMember:
    """One Kafka consumer-group member shared by the local subscriptions of (topic, group)."""

    def __init__(self, transport: Owner, topic: str, group: str, start: Start) -> None:
        self.transport = transport
        self.topic = topic
        self.group = group
        self.group_id = group_id(group, topic)  # the Kafka group id: kafka/groups.py
        self.retry_topic = retry_topic(topic, group)
        self.start = start
        self.subs: set[Subscription] = set()  # the local ones, each a KafkaSubscription
        self.consumer: AIOKafkaConsumer | None = None
        self.trackers: dict[TopicPartition, PartitionTracker] = {}
        self._revoked: dict[TopicPartition, PartitionTracker] = {}
        # records fetched, not handed out yet; and local redeliveries (message, attempt, token)
        # (partition, record): the partition object from getmany, so take() builds none
        self._buffer: deque[tuple[TopicPartition, ConsumerRecord[bytes, bytes]]] = deque()
        self._again: deque[tuple[Message, int, OffsetToken]] = deque()
        self._delayed: list[tuple[float, int, ConsumerRecord[bytes, bytes]]] = []
        self._fetch_lock = anyio.Lock()
        self._commit_lock = anyio.Lock()
        self._changed = anyio.Event()
        self._assigned_once = anyio.Event()
        self._dirty_seq = 0
        self._flushed_seq = 0
        self._paused_retry = False
        self._join_deadline = 0.0
        self.closed = False

    # -- lifecycle ----------------------------------------------------------------------

    async def open(self) -> None:
        """Join the group and wait (bounded by ``join_timeout``) for the first assignment and
        positions, so a ``start="latest"`` group is anchored before ``subscribe`` returns, and
        the first fetch of any group does not spend its timeout on the join. (Joining in the
        background was tried: a broker that delays joins, as Tansu does by half a session
        timeout, then moves that delay into the caller's first fetches instead.)"""
        t = self.transport
        self._join_deadline = time.monotonic() + t.join_timeout
        while True:
            try:
                with anyio.fail_after(max(0.0, self._join_deadline - time.monotonic())):
                    await self._join()
                return
            except TimeoutError:
                await self._stop_consumer()
                raise self._join_error() from None
            except KafkaError as e:
                await self._stop_consumer()
                # noida-db 0.2 answers a SyncGroup of concurrent joins with an empty assignment
                # now and then, which aiokafka cannot decode ("Unexpected error during
                # coordination"): a fresh member joins fine, so retry while time is left
                if time.monotonic() + 0.2 >= self._join_deadline:
                    raise TransportError(f"{t.url}: cannot join group {self.group!r}: {e!r}") from e
                log.warning("group %s on %s: join failed (%r); retrying", self.group, self.topic, e)
                self.trackers.clear()
                self._revoked.clear()
                self._buffer.clear()
                self._assigned_once = anyio.Event()
                await anyio.sleep(0.2)
            except BaseException:  # cancelled: leave no consumer running
                with anyio.CancelScope(shield=True):
                    await self._stop_consumer()
                raise

    async def _join(self) -> None:
        t = self.transport
        self.consumer = AIOKafkaConsumer(
            group_id=self.group_id,
            enable_auto_commit=False,
            auto_offset_reset=self.start,
            **t.consumer_options(),
        )
        await self.consumer.start()
        self.consumer.subscribe([self.topic, self.retry_topic], listener=_Listener(self))
        while not self._assigned_once.is_set():
            # assignment happens inside the fetch machinery; poll it without taking many
            # records
            async with self._fetch_lock:
                self._ingest(await self.consumer.getmany(timeout_ms=50, max_records=1))
        # anchor a new group: resolve and commit a position for every partition without one
        anchor: dict[TopicPartition, OffsetAndMetadata] = {}
        for tp, tr in list(self.trackers.items()):
            if tr.committed is None:
                tr.committed = await self.consumer.position(tp)
                anchor[tp] = OffsetAndMetadata(tr.committed, "")
        if anchor:
            await self.consumer.commit(anchor)
        await self.flush()  # offsets adopted from the group's old id (on_assigned)

    def _join_error(self) -> TransportError:
        t = self.transport
        return TransportError(
            f"{t.url}: joining group {self.group!r} on {self.topic!r} got no partition "
            f"assignment within {t.join_timeout}s"
        )

    async def close(self) -> None:
        """Commit what is acked and leave the group (unacked offsets go to the next owner)."""
        if self.closed:
            return
        self.closed = True
        try:
            await self.flush()
        except TransportError as e:
            log.warning("%s", e)
        self.transport.remember_metadata(self)
        await self._stop_consumer()

    async def _stop_consumer(self) -> None:
        if self.consumer is not None:
            consumer, self.consumer = self.consumer, None
            if not self._assigned_once.is_set():
                await abandon_join(consumer)
            try:
                await consumer.stop()
            except KafkaError as e:  # leaving is best effort: the session times out anyway
                log.warning("group %s on %s: error while leaving: %r", self.group, self.topic, e)

    # -- rebalance ------------------------------------------------------------------------

    async def on_revoked(self, revoked: set[TopicPartition]) -> None:
        # commit what is acked while we still own the partitions
        try:
            await self.flush()
        except TransportError as e:
            log.warning("%s", e)
        for tp in revoked:
            tr = self.trackers.pop(tp, None)
            if tr is not None:
                self._revoked[tp] = tr

    async def on_assigned(self, assigned: set[TopicPartition]) -> None:
        if self.consumer is None:
            return  # the join was cancelled and the consumer stopped: nothing to take over
        kept = {tp: tr for tp, tr in self._revoked.items() if tp in assigned}
        for tp, tr in self._revoked.items():
            if tp not in assigned:
                tr.revoked = True
        self._revoked = {}
        # records buffered for a partition we lost (or got back fresh) are re-read by whoever
        # owns it from its committed offset; a kept partition keeps its buffer (we seek past it)
        self._drop_all_but(set(kept))
        fresh = [tp for tp in assigned if tp not in kept]
        assert self.consumer is not None
        committed = await committed_offsets(self.consumer, fresh) if fresh else {}
        options = self.transport.consumer_options()
        adopted = await legacy_offsets(options, self.group, fresh, committed)
        remembered = self.transport.recall_metadata(self.topic, self.group)
        for tp, tr in kept.items():
            self.trackers[tp] = tr
            if tr.fetched_to is not None:
                self.consumer.seek(tp, tr.fetched_to)  # keep in-flight state, re-read nothing
        for tp in fresh:
            om = adopted.get(tp) or committed.get(tp)
            offset = om.offset if om is not None and om.offset >= 0 else None
            meta = om.metadata if om is not None else None
            if not meta and tp in remembered and remembered[tp][0] == offset:
                meta = remembered[tp][1]  # this process left it; the broker dropped the metadata
            tr = self.trackers[tp] = PartitionTracker(tp, offset, meta)
            if tp in adopted:  # committed under the bare group name: start there, and commit
                self.consumer.seek(tp, adopted[tp].offset)  # it under the new id next flush
                tr.dirty, self._dirty_seq = True, self._dirty_seq + 1
        self._assigned_once.set()
        self._notify()

    def _drop_all_but(self, live: set[TopicPartition]) -> None:
        self._again = deque(x for x in self._again if not x[2].tracker.revoked)
        self._buffer = deque(x for x in self._buffer if x[0] in live)
        self._delayed = [x for x in self._delayed if _tp(x[2]) in live]
        heapq.heapify(self._delayed)

    # -- fetching ---------------------------------------------------------------------------

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    def _ingest(self, batches: dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]) -> None:
        if not batches:
            return
        now_ms = time.time() * 1000
        ready: list[list[tuple[TopicPartition, ConsumerRecord[bytes, bytes]]]] = []
        for tp, records in batches.items():
            tr = self.trackers.get(tp)
            if tr is None:
                # revoked while the fetch was in flight (the new owner reads them), or on_assigned
                # has not made its tracker yet: read them again (anchoring would skip them)
                if records and self.consumer is not None and tp in self.consumer.assignment():
                    self.consumer.seek(tp, records[0].offset)
                continue
            retry = tp.topic == self.retry_topic
            mine = []
            for r in records:
                tr.fetched(r.offset)
                if retry:
                    due = due_at_ms(r.headers)
                    if due > now_ms:
                        heapq.heappush(self._delayed, (due / 1000, next(_tiebreak), r))
                        continue
                mine.append((tp, r))
            ready.append(mine)
        if len(ready) == 1:
            self._buffer.extend(ready[0])
        elif ready:
            # interleave partitions by record timestamp: deliveries come out in publish order
            # across keys as far as one fetch shows it (users expect that of a single
            # producer); merge never reorders records of one partition, so order per key holds
            self._buffer.extend(heapq.merge(*ready, key=_timestamp))
        self._pause_retry_if_needed()
        self._notify()

    def _pause_retry_if_needed(self) -> None:
        if self.consumer is None:
            return
        retry_tps = [tp for tp in self.trackers if tp.topic == self.retry_topic]
        if not self._paused_retry and len(self._delayed) > _MAX_DELAYED:
            self.consumer.pause(*retry_tps)
            self._paused_retry = True
        elif self._paused_retry and len(self._delayed) <= _MAX_DELAYED // 2:
            self.consumer.resume(*retry_tps)
            self._paused_retry = False

    def take(self, n: int) -> list[Delivery]:
        """Hand out up to ``n`` deliveries: local redeliveries, due retries, then new records."""
        out: list[Delivery] = []
        again = self._again
        while again and len(out) < n:
            msg, attempt, tok = again.popleft()
            tok.tracker.handout(tok.offset)
            out.append(Delivery(msg, attempt, tok))
        if self._delayed and len(out) < n:
            now = time.time()
            while self._delayed and self._delayed[0][0] <= now and len(out) < n:
                r = heapq.heappop(self._delayed)[2]
                self._buffer.appendleft((_tp(r), r))
            self._pause_retry_if_needed()
        buf, trackers, topic = self._buffer, self.trackers, self.topic
        while buf and len(out) < n:
            tp, r = buf.popleft()
            tr = trackers.get(tp)
            if tr is None or tr.is_acked(r.offset):
                continue  # revoked, or acked out of order before a previous owner left
            msg, reserved = decode_record(topic, r.partition, r.offset, r.key, r.value, r.headers)
            base = int(reserved.get(ATTEMPT_HEADER, "1") or 1)
            out.append(Delivery(msg, base + tr.handout(r.offset), OffsetToken(tr, r.offset)))
        if out:
            self._dirty_seq += 1
        return out

    def next_due(self) -> float | None:
        return self._delayed[0][0] if self._delayed else None

    async def poll(self, timeout: float) -> None:
        """Fetch records from Kafka into the local buffer, or wait for another local fetch."""
        if self._fetch_lock.locked() or self.consumer is None:
            changed = self._changed
            with anyio.move_on_after(timeout):
                await changed.wait()
            return
        async with self._fetch_lock:
            consumer = self.consumer
            if consumer is None:
                return
            batches: dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]] = {}
            try:
                # getmany waits without bound while a rebalance is in progress; cancelling it
                # there is safe (records are only taken synchronously, once it has some)
                with anyio.move_on_after(timeout + 0.05):
                    batches = await consumer.getmany(
                        timeout_ms=max(0, int(timeout * 1000)),
                        max_records=self.transport.fetch_max,
                    )
            except KafkaError as e:
                raise TransportError(f"{self.transport.url}: fetch failed: {e!r}") from e
            self._ingest(batches)
            if not self._assigned_once.is_set() and time.monotonic() > self._join_deadline:
                raise self._join_error()

    def give_back(self, deliveries: Sequence[Delivery]) -> None:
        """Deliveries a closing local subscription held: to the next local fetch, attempt+1."""
        for d in sorted(deliveries, key=lambda d: (d.token.tracker.tp, d.token.offset)):
            if not d.token.tracker.revoked:
                self._again.append((d.message, d.attempt + 1, d.token))
        self._notify()

    # -- acking -----------------------------------------------------------------------------

    def mark_acked(self, deliveries: Sequence[Delivery]) -> None:
        for d in deliveries:
            tok: OffsetToken = d.token
            if not tok.tracker.revoked:
                tok.tracker.ack(tok.offset)
        self._dirty_seq += 1

    async def flush(self) -> None:
        """Commit every changed partition (contiguous offsets + handout counts). Coalesces:
        a caller whose changes were covered by a commit that started later just waits."""
        mine = self._dirty_seq
        async with self._commit_lock:
            if self._flushed_seq >= mine or self.consumer is None:
                return
            seq = self._dirty_seq
            offsets = self._offsets({})
            if offsets:
                # cleared before the await: a change made while the commit is on the wire
                # marks the tracker dirty again for the next flush
                changed = [self.trackers[tp] for tp in offsets]
                for tr in changed:
                    tr.dirty = False
                try:
                    await self._commit(offsets)
                except BaseException:
                    for tr in changed:
                        tr.dirty = True
                    raise
            self._flushed_seq = seq

    def _offsets(
        self, acking: Mapping[PartitionTracker, list[int]]
    ) -> dict[TopicPartition, OffsetAndMetadata]:
        """What a commit sends: every partition changed since the last commit, and those with
        offsets in ``acking``, counted as acked."""
        out = {}
        for tp, tr in self.trackers.items():
            if tr.dirty or tr in acking:
                committed, meta = tr.preview(acking.get(tr, ()))
                if committed is not None:
                    out[tp] = OffsetAndMetadata(committed, meta)
        return out

    async def _commit(self, offsets: dict[TopicPartition, OffsetAndMetadata]) -> None:
        assert self.consumer is not None
        deadline = time.monotonic() + self.transport.commit_timeout
        while True:
            try:
                await self.consumer.commit(offsets)
                return
            except (CommitFailedError, IllegalStateError) as e:
                # the partitions moved to another member: what was not committed is redelivered
                # there (at-least-once); nothing to retry here
                log.info("group %s on %s: commit not possible: %r", self.group, self.topic, e)
                return
            except (RebalanceInProgressError, KafkaError) as e:
                retriable = isinstance(e, RebalanceInProgressError) or getattr(
                    e, "retriable", False
                )
                if not retriable or time.monotonic() > deadline:
                    raise TransportError(
                        f"{self.transport.url}: commit for group {self.group!r} on "
                        f"{self.topic!r} failed: {e!r}"
                    ) from e
                await anyio.sleep(0.2)

    async def transact(self, deliveries: Sequence[Delivery], messages: Sequence[Message]) -> None:
        """Produce ``messages`` and commit the offsets that acking ``deliveries`` gives, in one
        Kafka transaction (:mod:`~herald.transports.kafka.transactions`); then ack them."""
        batches = by_topic(messages)
        tokens: list[OffsetToken] = [d.token for d in deliveries]
        if any(tok.tracker.revoked for tok in tokens):
            raise TransportError(
                f"{self.transport.url}: group {self.group!r} on {self.topic!r}: a partition "
                "moved to another member before the transaction; its new owner redelivers"
            )
        acking: dict[PartitionTracker, list[int]] = {}
        for tok in tokens:
            acking.setdefault(tok.tracker, []).append(tok.offset)
        async with self._commit_lock:  # no plain commit of the same partitions in between
            await self.transport.transactions.run(batches, self._offsets(acking), self.group_id)
        self.mark_acked(deliveries)

    async def nack(self, delivery: Delivery, delay: float) -> None:
        """Produce a retry copy (durably), then ack the original."""
        m = delivery.message
        due_ms = int((time.time() + max(0.0, delay)) * 1000)
        extra = [
            (ATTEMPT_HEADER, str(delivery.attempt + 1).encode()),
            (DUE_AT_HEADER, str(due_ms).encode()),
        ]
        await self.transport.produce(self.retry_topic, [m], extra)
        self.mark_acked([delivery])
        await self.flush()


def _tp(r: ConsumerRecord[bytes, bytes]) -> TopicPartition:
    return TopicPartition(r.topic, r.partition)


def _timestamp(x: tuple[TopicPartition, ConsumerRecord[bytes, bytes]]) -> int:
    return x[1].timestamp  # type: ignore[no-any-return]
