"""Scheduled publish: a message published now, delivered to its topic at a later time.

``await app.publish("orders.timeout", event, delay=timedelta(minutes=30))`` (or
``at=aware_datetime``) does not wait: the message is published at once, durably, to one
internal *schedule topic* (``herald.scheduled`` unless the App names another), with two headers
naming its target and due time:

``scheduled.topic``   the topic it is for
``scheduled.due_at``  when it is due, UTC RFC 3339 with milliseconds (rounded up)

It keeps its own id, key, type, headers and payload. Every running App runs one
:class:`Scheduler` (unless ``App(scheduler=False)``): one loop over a subscription of the schedule
topic in the fixed group ``herald.scheduler``, so the Apps of a system share the work. A delivery
not due within :data:`HOLD` seconds is nacked with a delay, which every transport keeps durably
(SQLite ``visible_at``, Redis retry set, RabbitMQ TTL queues, NATS nak delay, Kafka and MQTT
retry topics): the long wait is done by the broker, not by a process, so it survives a restart
of the App and, where the broker keeps its data, of the broker. A delivery due within
:data:`HOLD` seconds is held by the scheduler, unacked, and a task of its own publishes it to
its target topic at its due time — without the two headers, otherwise exactly as it was
scheduled — and then acks it. So the last stretch does not depend on how precisely an engine
redelivers, and a message held when its App stops goes back to the group, unacked.

Each nack waits a power of two of milliseconds, at most :data:`MAX_STEP` (2**18 ms, about 4.4
minutes), chosen to bring the message back :data:`LEAD` seconds before it is due (an engine may
take that long to redeliver without making it late); the next wait is worked out afresh from
the due time when it comes back. A power of two because some engines keep delayed messages in
FIFO queues per delay class (RabbitMQ's TTL queues are powers of two of milliseconds): when
every message of such a queue waits exactly as long, none is held up behind a longer one. The
cap bounds how long one wait can occupy a consumer's window (MQTT holds not-yet-due messages in
its in-flight window, Kafka holds back the retry partition's committed offset), so long delays
(days) are many short waits: about 14 an hour per message. The growing ``attempt`` number of
these redeliveries means nothing here: the scheduler never dead-letters a message for it, and
no transport does either.

Guarantees:

* Never early: a message is forwarded only once the scheduling clock (``time.time()`` of the
  App that forwards it) has reached its due time; a transport that hands it back early only
  causes another wait. Apps on different machines need synchronised clocks (NTP).
* Late by little: how late depends on the engine's delayed redelivery; ``README.md`` has
  the figures measured by ``benchmarks/schedule_precision.py``.
* At-least-once: forward, then ack. A crash in between forwards the message twice, with the
  same message id, so an idempotent consumer (``dedupe=True``) drops the repeat. Where the
  transport has transactions (memory, SQLite, Kafka brokers with them) forward and ack are
  one :meth:`~herald.transports.base.Subscription.commit`: exactly once (on Kafka, for readers
  with ``isolation_level=read_committed``).
* While no App runs a scheduler the messages wait in the schedule topic, durably, and go out
  as soon as one runs (late, then, by the time nothing ran). ``memory://`` keeps them only in
  the process, like everything on it.

A message on the schedule topic without valid schedule headers (a plain client's mistake)
is dead-lettered to ``herald.scheduled.herald.scheduler.dlq`` with reason
``"invalid schedule"``; one whose forward keeps failing (:data:`FORWARD_ATTEMPTS` times in a
row in one process, say a permission the App lacks on its target) with ``"forward failed"``.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import anyio
from anyio.abc import TaskStatus

from herald.dlq import REPLAY_GROUP, TOOL_GROUP
from herald.message import Message
from herald.middleware.deadletter import dead_letter
from herald.transports.base import (
    Delivery,
    Subscription,
    Transport,
    TransportError,
    validate_name,
)

__all__ = [
    "DUE_HEADER",
    "HOLD",
    "LEAD",
    "MAX_STEP",
    "SCHEDULER_GROUP",
    "SCHEDULE_TOPIC",
    "TARGET_HEADER",
    "Scheduler",
    "SchedulerStats",
    "due_time",
    "next_wait",
    "read_schedule",
    "scheduled",
    "to_schedule",
]

log = logging.getLogger("herald.scheduler")

#: The default schedule topic.
SCHEDULE_TOPIC = "herald.scheduled"
#: The group every App's scheduler joins on the schedule topic.
SCHEDULER_GROUP = "herald.scheduler"
#: Header naming a scheduled message's target topic.
TARGET_HEADER = "scheduled.topic"
#: Header with a scheduled message's due time (UTC RFC 3339, milliseconds).
DUE_HEADER = "scheduled.due_at"
#: Longest single wait (seconds): 2**18 ms.
MAX_STEP = (1 << 18) / 1000
#: A message due within this many seconds is held by the scheduler (unacked) and forwarded
#: on time, rather than nacked again: the last stretch does not depend on the engine.
HOLD = 2.0
#: Each nack aims to bring the message back this many seconds before it is due, so that the
#: engine's redelivery may take that long without making it late.
LEAD = 1.0
#: Forward failures in a row (in one process) after which a message is dead-lettered.
FORWARD_ATTEMPTS = 5

_FETCH = 256
_FETCH_TIMEOUT = 1.0  # seconds a fetch waits before re-checking for stop
_NACKS_AT_ONCE = 16
_tiebreak = itertools.count()
_LATEST = datetime(9999, 1, 1, tzinfo=UTC).timestamp()


# --- the scheduled message ----------------------------------------------------------------


def due_time(delay: timedelta | float | None, at: datetime | None) -> float | None:
    """The due time (Unix seconds) that ``delay=`` or ``at=`` ask for; ``None`` for neither.

    ``delay`` is a :class:`~datetime.timedelta` or a number of seconds, ``>= 0``; ``at`` is a
    timezone-aware :class:`~datetime.datetime` (a naive one is refused: it names no instant).
    A due time that has passed is returned as it is: the caller publishes such a message at
    once. Raises ``TypeError``/``ValueError`` with what was wrong.
    """
    if delay is None and at is None:
        return None
    if delay is not None and at is not None:
        raise ValueError("give delay= or at=, not both")
    if at is not None:
        if not isinstance(at, datetime):
            raise TypeError(f"at= takes a timezone-aware datetime, got {type(at).__name__}")
        if at.tzinfo is None or at.utcoffset() is None:
            raise ValueError(
                f"at={at!r} is a naive datetime, which names no instant: give it a timezone, "
                "e.g. datetime.now(UTC) + timedelta(minutes=5)"
            )
        due = at.timestamp()
    else:
        if isinstance(delay, timedelta):
            seconds = delay.total_seconds()
        elif isinstance(delay, int | float) and not isinstance(delay, bool):
            seconds = float(delay)
        else:
            raise TypeError(
                f"delay= takes a datetime.timedelta or a number of seconds, got "
                f"{type(delay).__name__} (for a point in time use at=)"
            )
        if not math.isfinite(seconds) or seconds < 0:
            raise ValueError(f"delay= must be a finite duration >= 0, got {delay!r}")
        due = time.time() + seconds
    if due >= _LATEST:
        raise ValueError(f"the due time {delay or at!r} is too far in the future (year 9999+)")
    return due


def scheduled(messages: Sequence[Message], due: float, schedule_topic: str) -> list[Message]:
    """The copies of ``messages`` that go to ``schedule_topic``, to be forwarded to their own
    topic at ``due`` (Unix seconds). Their headers must not already use the schedule names."""
    stamp = _format_due(due)
    out = []
    for m in messages:
        if TARGET_HEADER in m.headers or DUE_HEADER in m.headers:
            raise ValueError(
                f"headers {TARGET_HEADER!r} and {DUE_HEADER!r} are the scheduler's own; a "
                "scheduled message cannot carry them"
            )
        headers = dict(m.headers)
        headers[TARGET_HEADER] = m.topic
        headers[DUE_HEADER] = stamp
        out.append(m.replace(topic=schedule_topic, headers=headers))
    return out


def to_schedule(messages: Sequence[Message], due: float | None, topic: str) -> list[Message]:
    """What publishing ``messages`` (each for its own ``topic``) due at ``due`` (from
    :func:`due_time`) stores: the :func:`scheduled` copies for the schedule ``topic``, or the
    messages themselves when there is no due time or it has passed."""
    if due is None or due <= time.time():
        return list(messages)
    return scheduled(messages, due, topic)


def read_schedule(message: Message) -> tuple[Message, float]:
    """The message to forward (to its target topic, schedule headers removed) and its due
    time. Raises ``ValueError`` when the schedule headers are missing or malformed."""
    headers = dict(message.headers)
    target = headers.pop(TARGET_HEADER, None)
    stamp = headers.pop(DUE_HEADER, None)
    if target is None or stamp is None:
        raise ValueError(f"no {TARGET_HEADER!r} and {DUE_HEADER!r} headers")
    validate_name("topic", target)
    try:
        due = datetime.fromisoformat(stamp)
    except ValueError:
        raise ValueError(f"{DUE_HEADER} {stamp!r} is not an RFC 3339 time") from None
    if due.tzinfo is None:
        raise ValueError(f"{DUE_HEADER} {stamp!r} has no time zone")
    if headers.get(REPLAY_GROUP) == SCHEDULER_GROUP:
        del headers[REPLAY_GROUP]  # replayed from the scheduler's dead letters: for everyone
    return message.replace(topic=target, headers=headers), due.timestamp()


def next_wait(remaining: float) -> float:
    """How long the nack of a message due in ``remaining`` seconds waits: the largest power of
    two of milliseconds that brings it back :data:`LEAD` seconds before it is due, at most
    :data:`MAX_STEP` (see the module)."""
    ms = int(min(remaining - LEAD, MAX_STEP) * 1000)
    if ms < 1:
        return 0.0
    return (1 << (ms.bit_length() - 1)) / 1000


def _format_due(due: float) -> str:
    ms = math.ceil(round(due * 1000, 3))  # rounded up: a due time is never moved earlier
    dt = datetime.fromtimestamp(ms // 1000, tz=UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


# --- the loop -----------------------------------------------------------------------------


@dataclass(slots=True)
class SchedulerStats:
    """Counters of one scheduler since start."""

    #: messages published to their target topic
    forwarded: int = 0
    #: nacks of messages not due yet (each wait of a long delay counts)
    waits: int = 0
    #: forwards that failed (and were tried again later)
    forward_failures: int = 0
    dead_lettered: int = 0


class Scheduler:
    """Forwards due messages from the schedule topic to their targets (see the module).

    ``run`` subscribes and loops until :meth:`stop`. Where the transport has ``replay`` it
    reports itself started before subscribing (a Kafka join takes seconds, and the schedule
    topic keeps what is published meanwhile); where it has not (MQTT drops what no group
    subscribed for) only once the group exists.
    """

    def __init__(self, transport: Transport, topic: str = SCHEDULE_TOPIC) -> None:
        self.transport = transport
        self.topic = validate_name("topic", topic)
        self.stats = SchedulerStats()
        #: set once the scheduler has joined its group (a Kafka join takes seconds)
        self.joined = anyio.Event()
        self._stopping = False
        self._scope: anyio.CancelScope | None = None
        self._atomic: bool | None = None  # forward+ack in one commit; None: not tried yet
        self._failures: dict[str, int] = {}  # message id -> forward failures in a row
        self._kept_dead_letters = False
        #: deliveries due within HOLD seconds, unacked until forwarded: (due, n, delivery, copy)
        self._held: list[tuple[float, int, Delivery, Message]] = []
        self._wake = anyio.Event()

    def stop(self) -> None:
        """Stop fetching; the batch being forwarded finishes, then :meth:`run` returns."""
        self._stopping = True
        if self._scope is not None:
            self._scope.cancel()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        early = self.transport.features.replay
        if early:
            task_status.started()
        sub: Subscription | None = None
        with anyio.CancelScope() as scope:  # stop() may come while a Kafka join is under way
            self._scope = scope
            if not self._stopping:
                sub = await self.transport.subscribe(self.topic, SCHEDULER_GROUP)
        if not early:
            task_status.started()
        if sub is None:
            return
        self.joined.set()
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._release, sub)
                while not self._stopping:
                    batch: list[Delivery] = []
                    with anyio.CancelScope() as scope:
                        self._scope = scope
                        if not self._stopping:
                            batch = await sub.fetch(_FETCH, _FETCH_TIMEOUT)
                    if batch:
                        with anyio.CancelScope(shield=True):  # what was fetched is settled
                            await self._settle(sub, batch)
                tg.cancel_scope.cancel()  # a forward under way finishes (it is shielded)
        finally:
            self._scope = None
            self._held.clear()
            with anyio.CancelScope(shield=True):
                await sub.close()  # held deliveries go back to the group

    async def _settle(self, sub: Subscription, batch: list[Delivery]) -> None:
        """Hold what is due within HOLD seconds (or due already), nack the rest."""
        now = time.time()
        later: list[tuple[Delivery, float]] = []
        held = self._held
        for d in batch:
            try:
                message, at = read_schedule(d.message)
            except ValueError as e:
                await self._dead_letter(sub, d, "invalid schedule", e)
                continue
            if at - now <= HOLD:
                heapq.heappush(held, (at, next(_tiebreak), d, message))
            else:
                later.append((d, at))
        if held and held[0][0] <= now + HOLD:
            self._wake.set()
        if later:
            # several at once: each nack is a round trip (two on some engines) that the engine
            # pipelines (on MQTT one nack alone takes ~90 ms: Nagle meets delayed ACK); bounded,
            # as each may take a connection of its own (Redis' pool)
            limit = anyio.CapacityLimiter(_NACKS_AT_ONCE)

            async def nack(d: Delivery, at: float) -> None:
                async with limit:
                    await sub.nack(d, next_wait(at - time.time()))

            async with anyio.create_task_group() as tg:
                for d, at in later:
                    tg.start_soon(nack, d, at)
            self.stats.waits += len(later)

    async def _release(self, sub: Subscription) -> None:
        """Forward held deliveries at their due time: a task of its own, so that fetching,
        nacking and the engine's fetch timeouts never make a due message wait."""
        held = self._held
        while True:
            self._wake = anyio.Event()
            if not held:
                await self._wake.wait()
                continue
            wait = held[0][0] - time.time()
            if wait > 0:
                with anyio.move_on_after(wait):
                    await self._wake.wait()
                continue  # woken: an earlier message may have arrived
            now = time.time()
            due: list[tuple[Delivery, Message]] = []
            while held and held[0][0] <= now:
                _, _, d, message = heapq.heappop(held)
                due.append((d, message))
            with anyio.CancelScope(shield=True):
                await self._forward(sub, due)

    async def _forward(self, sub: Subscription, due: list[tuple[Delivery, Message]]) -> None:
        if await self._can_commit(sub):
            try:
                await sub.commit([d for d, _ in due], [m for _, m in due])
            except Exception as e:  # then one topic at a time, to single out a bad target
                log.warning("scheduler: commit failed (%r); forwarding by topic", e)
            else:
                self._forwarded(due)
                return
        by_target: dict[str, list[tuple[Delivery, Message]]] = {}
        for d, m in due:
            by_target.setdefault(m.topic, []).append((d, m))
        for target, items in by_target.items():
            try:
                await self.transport.publish(target, [m for _, m in items])
            except Exception as e:  # one target failing must not hold up the others
                await self._failed(sub, items, e)
                continue
            await sub.ack([d for d, _ in items])
            self._forwarded(items)

    async def _can_commit(self, sub: Subscription) -> bool:
        """Whether forward and ack go in one commit: asked of the transport once."""
        if self._atomic is None:
            self._atomic = False
            if self.transport.features.transactions:
                try:
                    await sub.commit([], [])
                    self._atomic = True
                except TransportError as e:  # a Kafka broker without transactions (Tansu)
                    log.info("scheduler on %s: forwarding without transactions: %s", sub.topic, e)
        return self._atomic

    def _forwarded(self, items: list[tuple[Delivery, Message]]) -> None:
        self.stats.forwarded += len(items)
        if self._failures:
            for _, m in items:
                self._failures.pop(m.id, None)

    async def _failed(
        self, sub: Subscription, items: list[tuple[Delivery, Message]], error: Exception
    ) -> None:
        self.stats.forward_failures += len(items)
        for d, m in items:
            n = self._failures.get(m.id, 0) + 1
            if n >= FORWARD_ATTEMPTS:
                self._failures.pop(m.id, None)
                await self._dead_letter(sub, d, "forward failed", error)
                continue
            self._failures[m.id] = n
            wait = min(2.0**n, 60.0)
            log.warning(
                "scheduler: forwarding %s to %r failed (%r); trying again in %.0fs",
                m.id,
                m.topic,
                error,
                wait,
            )
            await sub.nack(d, wait)

    async def _dead_letter(
        self, sub: Subscription, d: Delivery, reason: str, error: Exception
    ) -> None:
        letter = dead_letter(
            d.message,
            group=SCHEDULER_GROUP,
            handler="herald.scheduler",
            reason=reason,
            error=error,
            attempts=d.attempt,
        )
        if not self._kept_dead_letters and not self.transport.features.replay:
            # an engine without replay keeps a topic's messages only for groups that exist
            keep = await self.transport.subscribe(letter.topic, TOOL_GROUP)
            await keep.close()
        self._kept_dead_letters = True
        await self.transport.publish(letter.topic, [letter])
        await sub.ack([d])
        self.stats.dead_lettered += 1
        log.error(
            "scheduler: %s dead-lettered to %s (%s: %s)", d.message.id, letter.topic, reason, error
        )
