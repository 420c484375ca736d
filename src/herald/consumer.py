"""The consume loop of one group: fetch, dispatch to the right handler, ack — or fail safely.

One :class:`GroupConsumer` runs per (topic, group) the app subscribes to. It pulls batches from
its subscription and hands each delivery to the first handler of the group that accepts the
message's type and passes its filter. A delivery is acked only after its handler returned and
everything the handler published is stored. On an exception it is retried in-process, then
nacked with a delay, then dead-lettered (see :mod:`herald.middleware.retry`). A payload that
does not decode, or a :class:`herald.Permanent` error, is dead-lettered at once. A delivery is never
left to spin: every path ends in ack, nack-with-delay, or the dead letters.

Concurrency: with ``concurrency=1`` deliveries are handled one by one in the fetch loop (the
fast path). With more, a fetcher feeds ``concurrency`` worker tasks; with ``ordered=True`` each
key always goes to the same worker, so one key is handled one message at a time, in order.

Transactional groups (``transactional=True``): what a handler publishes through its
:class:`Context` is held in the context's outbox; when the batch is acked, the outboxes of the
handled deliveries go out with the ack in one :meth:`Subscription.commit`. A failed attempt's
outbox is dropped (each attempt starts empty), so only the successful attempt's messages are
ever published. If the commit fails, the deliveries are nacked and handled again.

Stopping: :meth:`stop` ends fetching; handlers already running finish; deliveries fetched but
not started go back to the group when the subscription closes.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import anyio
from anyio.abc import TaskStatus

from herald.app_like import AppLike
from herald.context import Context
from herald.errors import DecodeError
from herald.message import Message, utc_now_rfc3339
from herald.middleware.base import CallNext, Middleware
from herald.middleware.deadletter import (
    REPLAY_GROUP,
    dead_letter,
    dead_letter_topic,
    skipped,
    skipped_topic,
    tool_group,
)
from herald.middleware.dedupe import Dedupe
from herald.middleware.retry import Retry
from herald.subscriber import GroupSpec, Handler
from herald.transports.base import Delivery, Subscription

__all__ = ["ConsumerStats", "GroupConsumer"]

log = logging.getLogger("herald.consumer")

_FETCH_TIMEOUT = 1.0  # seconds a fetch waits before re-checking for stop
# distinct unhandled types counted (and warned about) per group: a producer sending a new
# type per message must not grow memory without bound
_MAX_TYPES = 256
# messages whose first failure time is remembered across redeliveries, per group consumer
_MAX_FAILING = 10_000


@dataclass(slots=True)
class ConsumerStats:
    """Counters of one group consumer since start."""

    handled: int = 0
    failed_calls: int = 0
    redelivered: int = 0
    dead_lettered: int = 0
    unhandled: int = 0
    filtered: int = 0
    #: messages of each type no handler of the group takes (at most _MAX_TYPES types tracked)
    unhandled_types: dict[str, int] = field(default_factory=dict)


class GroupConsumer:
    def __init__(
        self, app: AppLike, spec: GroupSpec, retry: Retry, middleware: Sequence[Middleware] = ()
    ) -> None:
        self.app = app
        self.spec = spec
        chain = [m.for_group(spec.topic, spec.group) for m in middleware]
        listed = [m for m in chain if isinstance(m, Retry)]
        _check_order(chain)
        #: the policy for redelivery and dead-lettering: a listed Retry, else the given one
        self.retry = listed[-1] if listed else retry
        # With no middleware the chain is skipped and _failed does the in-process retries
        # (same behaviour as an innermost Retry, at no cost on success). With middleware and
        # no listed Retry, the implicit one is innermost (inlined in _run_chain: no frame
        # unless a call fails), but outside a transactional inbox, so each attempt runs in a
        # fresh transaction and a failed attempt's writes roll back.
        self._chain: list[Middleware] = chain
        self._innermost_retry: Retry | None = None
        if chain and not listed:
            at = _first_transactional_dedupe(chain)
            if at is None:
                self._innermost_retry = retry
            else:
                chain.insert(at, retry)
        self._flushers = [m for m in self._chain if _overrides(m, "before_ack")]
        self.stats = ConsumerStats()
        self._stopping = False
        self._sub: Subscription | None = None
        self._fetch_scope: anyio.CancelScope | None = None
        # first failure time per message id (this consumer is one group), kept across
        # redeliveries for the dead letter's dlq.first_failure_at; least recently failed
        # entries are evicted past _MAX_FAILING, so memory stays bounded
        self._first_failure: OrderedDict[str, str] = OrderedDict()
        handlers = spec.handlers
        # fast path: one handler and no filter needs no dispatch loop
        self._only = handlers[0] if len(handlers) == 1 and handlers[0].filter is None else None
        self._skip_unhandled = app.unhandled == "skip"
        # transactional groups: the outbox of each delivery being handled
        self._outboxes: dict[Delivery, list[Message]] | None = {} if spec.transactional else None

    @property
    def chain(self) -> list[Middleware]:
        """The group's middleware instances, outermost first (empty: the fast path)."""
        return list(self._chain)

    def stop(self) -> None:
        """Stop fetching. Running handlers finish; :meth:`run` then returns."""
        self._stopping = True
        if self._fetch_scope is not None:
            self._fetch_scope.cancel()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Subscribe, report started, consume until :meth:`stop`, then close the subscription."""
        spec = self.spec
        for m in self._chain:
            await m.startup()
        await self._keep_dead_letters()
        transport = self.app.transport
        if spec.transactional and not transport.features.transactions:
            raise ValueError(
                f"group {spec.group!r} on {spec.topic!r} is transactional, but {transport.url} "
                "has no transactions (features.transactions is False)"
            )
        self._sub = await transport.subscribe(
            spec.topic, spec.group, start=spec.start, bind=spec.bind, source=spec.source
        )
        if spec.transactional:
            try:
                await self._sub.commit([], [])  # a broker without transactions says so now
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await self._sub.close()
                raise
        task_status.started()
        try:
            if spec.concurrency == 1:
                await self._run_inline(self._sub)
            else:
                await self._run_pool(self._sub)
        finally:
            if self._outboxes:
                self._outboxes.clear()  # handlers cut off at shutdown: their messages never go out
            with anyio.CancelScope(shield=True):
                await self._sub.close()
                for m in reversed(self._chain):
                    await m.shutdown()

    async def _keep_dead_letters(self) -> None:
        """On a broker that keeps messages only for groups that exist (no replay: RabbitMQ
        without its parked queue, MQTT), join the tooling's group on this group's dead-letter
        (and skipped) topic, so a dead letter published before anyone looks is kept, not
        dropped. Persistent transports with replay keep them anyway."""
        transport = self.app.transport
        if transport.features.replay:
            return
        topics = [dead_letter_topic(self.spec.topic, self.spec.group)]
        if self._skip_unhandled:
            topics.append(skipped_topic(self.spec.topic, self.spec.group))
        for topic in topics:
            sub = await transport.subscribe(topic, tool_group(topic), start="earliest")
            await sub.close()

    async def _fetch(self, sub: Subscription) -> list[Delivery]:
        with anyio.CancelScope() as scope:
            self._fetch_scope = scope
            if self._stopping:
                return []
            return await sub.fetch(self.spec.prefetch, _FETCH_TIMEOUT)
        return []  # cancelled by stop()

    async def _run_inline(self, sub: Subscription) -> None:
        only = self._only
        if only is not None and only.plain and not self._chain:
            return await self._run_fast(sub, only)
        while not self._stopping:
            batch = await self._fetch(sub)
            done: list[Delivery] = []
            try:
                for d in batch:
                    if self._stopping:
                        break  # the rest goes back to the group on close
                    if await self._handle(d):
                        done.append(d)
            finally:
                if done:
                    await self._ack(sub, done)

    async def _run_fast(self, sub: Subscription, only: Handler) -> None:
        """The hot path for a single plain async handler and no middleware: decode and call
        inline, without another coroutine frame per message. Anything unusual (another type,
        a replay for another group, an oversized payload, any exception) takes the general
        path through _handle / _undecodable / _failed, so behaviour is identical."""
        accepts = only.decoder.accepts
        raw, func = only.decoder.raw, only.func
        limit = self.app.max_payload
        handle = self._handle
        while not self._stopping:
            batch = await self._fetch(sub)
            # Bookkeeping is by exception: count the deliveries *finished* (a handler cancelled
            # at shutdown is not, so it is not acked), remember only the rare ones that must not
            # be acked (nacked for redelivery) or that did not end in the handler's success.
            reached = 0
            nacked: list[Delivery] = []
            not_handled = 0
            try:
                for d in batch:
                    if self._stopping:
                        break  # the rest goes back to the group on close
                    msg = d.message
                    t = msg.type
                    if (
                        (t is not None and accepts is not None and t not in accepts)
                        or REPLAY_GROUP in msg.headers
                        or len(msg.payload) > limit
                    ):
                        if not await handle(d):  # _handle counts its own outcome
                            nacked.append(d)
                        not_handled += 1
                        reached += 1
                        continue
                    try:
                        event = raw(msg)
                    except Exception as e:
                        if not await self._undecodable(d, only, e):
                            nacked.append(d)
                        not_handled += 1
                        reached += 1
                        continue
                    try:
                        await func(event)
                    except Exception as e:
                        if not await self._failed(only, event, d, e):
                            nacked.append(d)
                        not_handled += 1
                        reached += 1
                        continue
                    reached += 1
            finally:
                self.stats.handled += reached - not_handled
                done = batch if reached == len(batch) else batch[:reached]
                if nacked:
                    done = [d for d in done if d not in nacked]
                if done:
                    await self._ack(sub, done)

    async def _run_pool(self, sub: Subscription) -> None:
        n = self.spec.concurrency
        lanes = n if self.spec.ordered else 1
        streams = [
            anyio.create_memory_object_stream[Delivery](self.spec.prefetch) for _ in range(lanes)
        ]
        async with anyio.create_task_group() as tg:
            for i in range(n):
                recv = streams[i % lanes][1]
                tg.start_soon(self._worker, sub, recv.clone())
            for _, recv in streams:
                recv.close()
            try:
                while not self._stopping:
                    for d in await self._fetch(sub):
                        key = d.message.key
                        lane = hash(key) % lanes if lanes > 1 and key is not None else 0
                        await streams[lane][0].send(d)
            finally:
                for send, _ in streams:
                    send.close()

    async def _worker(self, sub: Subscription, recv: Any) -> None:
        async with recv:
            async for d in recv:
                if self._stopping:
                    return  # fetched but not started: returned to the group on close
                if await self._handle(d):
                    await self._ack(sub, [d])

    async def _ack(self, sub: Subscription, done: list[Delivery]) -> None:
        """Ack handled deliveries, after the middleware made their side state durable (and,
        in a transactional group, together with what their handlers published)."""
        with anyio.CancelScope(shield=True):
            try:
                for m in self._flushers:
                    await m.before_ack()
                if self._outboxes is not None:
                    outboxes = self._outboxes
                    out = [m for d in done for m in outboxes.pop(d, ())]
                    await sub.commit(done, out)
                    return
            except Exception:
                log.exception(
                    "group %s on %s: could not flush or commit; %d deliveries will be redelivered",
                    self.spec.group, self.spec.topic, len(done),
                )  # fmt: skip
                for d in done:
                    await sub.nack(d, self.retry.redelivery_backoff(1))
                return
            await sub.ack(done)

    def _context(self, d: Delivery, handler: str = "") -> Context:
        ctx = Context(self.app, d.message, d.attempt, self.spec.group, handler)
        if self._outboxes is not None:
            ctx.outbox = self._outboxes[d] = []
        return ctx

    # --- one delivery -------------------------------------------------------------------------

    def _pick(self, msg: Message) -> Handler | None:
        """The first handler that accepts the message's type and passes its filter."""
        type_known = False
        for h in self.spec.handlers:
            if h.decoder.accepts_type(msg.type):
                type_known = True
                if h.filter is None or h.filter(msg):
                    return h
        if type_known:
            self.stats.filtered += 1
        else:
            self._count_unhandled(msg)
        return None

    def _count_unhandled(self, msg: Message) -> None:
        """Count a message no handler takes; the first of each type is logged at WARNING
        (a renamed producer class would otherwise vanish without a trace)."""
        self.stats.unhandled += 1
        per_type = self.stats.unhandled_types
        t = msg.type or "-"
        if t in per_type:
            per_type[t] += 1
            return
        if len(per_type) >= _MAX_TYPES:
            return  # counted in the total only; the first _MAX_TYPES types were logged
        per_type[t] = 1
        spec = self.spec
        where = (
            f"skipped to {skipped_topic(spec.topic, spec.group)}"
            if self._skip_unhandled
            else "acked and dropped"
        )
        log.warning(
            "group %s on %s: no handler takes type %r; such messages are %s (logged once "
            "per type, counted in stats.unhandled). If this group should handle it, add a "
            "handler for that type (or a union annotation covering it, e.g. a renamed class); "
            "to keep them, use App(unhandled=\"skip\")",
            spec.group, spec.topic, t, where,
            extra={"group": spec.group, "topic": spec.topic, "event_type": t},
        )  # fmt: skip

    async def _handle(self, d: Delivery) -> bool:
        """Handle one delivery. True: ack it. False: it was nacked for redelivery."""
        msg = d.message
        target = msg.headers.get(REPLAY_GROUP)
        if target is not None and target != self.spec.group:
            self.stats.filtered += 1  # a replay meant for another group, which failed it
            return True
        if len(msg.payload) > self.app.max_payload:
            error = DecodeError(
                f"payload of {len(msg.payload):,} bytes exceeds max_payload "
                f"{self.app.max_payload:,}; not decoded"
            )
            return await self._dead_letter(d, "-", error, "oversized payload")
        h = self._only
        if h is None or (msg.type is not None and not h.decoder.accepts_type(msg.type)):
            try:
                h = self._pick(msg)
            except Exception as e:  # a filter that raises is a bug there, not a transient error
                return await self._dead_letter(d, "filter", e, "filter raised")
            if h is None:
                if self._skip_unhandled and self._unhandled_type(msg):
                    await self._publish_shielded(skipped(msg, self.spec.group))
                return True
        try:
            event = h.decoder.raw(msg)
        except Exception as e:
            return await self._undecodable(d, h, e)
        try:
            if self._chain:
                await self._run_chain(h, event, d)
            elif h.plain:  # the common case, without the extra frame of _call
                await h.func(event)
            else:
                await self._call(h, event, d)
        except Exception as e:
            return await self._failed(h, event, d, e)
        self.stats.handled += 1
        return True

    async def _undecodable(self, d: Delivery, h: Handler, e: Exception) -> bool:
        error = h.decoder.explain(e)
        if error is not e:
            error.__cause__ = e
        return await self._dead_letter(d, h.name, error, "undecodable payload")

    async def _failed(self, h: Handler, event: Any, d: Delivery, error: Exception) -> bool:
        """The failure path: retry in-process, then nack with a delay, then dead-letter."""
        msg = d.message
        retry = self.retry
        failures = 0
        first_failure = self._remember_failure(msg.id)
        while True:
            failures += 1
            self.stats.failed_calls += 1
            if not retry.retryable(error):
                reason = getattr(error, "dlq_reason", "permanent error")
                return await self._dead_letter(d, h.name, error, reason)
            # a chain has done its in-process retries already (its Retry middleware)
            if self._chain or failures >= retry.attempts or self._stopping:
                break
            log.debug("handler %s failed (%r), retrying in-process", h.name, error)
            await anyio.sleep(retry.backoff(failures))
            try:
                await self._call(h, event, d)
            except Exception as e:
                error = e
                continue
            self.stats.handled += 1
            self._first_failure.pop(msg.id, None)
            return True
        if d.attempt >= retry.deliveries:
            return await self._dead_letter(d, h.name, error, "retries exhausted")
        delay = retry.redelivery_backoff(d.attempt)
        log.warning(
            "handler %s failed on delivery %d of %s (%s: %s); redelivering in %.2fs",
            h.name, d.attempt, msg.id, type(error).__name__, error, delay,
            extra={"correlation_id": msg.correlation_id, "first_failure_at": first_failure},
        )  # fmt: skip
        self.stats.redelivered += 1  # the first failure time is kept for the next delivery
        await self._sub_nack(d, delay)
        return False

    def _remember_failure(self, message_id: str) -> str:
        """The time ``message_id`` first failed in this group (now, if this is the first)."""
        failures = self._first_failure
        first = failures.get(message_id)
        if first is None:
            first = failures[message_id] = utc_now_rfc3339()
            if len(failures) > _MAX_FAILING:
                failures.popitem(last=False)
        else:
            failures.move_to_end(message_id)
        return first

    async def _call(self, h: Handler, event: Any, d: Delivery) -> None:
        ctx = self._context(d) if h.wants_ctx or h.publishes else None
        await self._invoke(h, event, ctx)

    async def _run_chain(self, h: Handler, event: Any, d: Delivery) -> None:
        ctx = self._context(d, h.name)
        retry = self._innermost_retry

        async def invoke() -> None:
            await (h.func(event) if h.plain else self._invoke(h, event, ctx))

        async def innermost() -> None:
            # the implicit innermost Retry, inlined: no extra frame unless a call fails
            try:
                await (h.func(event) if h.plain else self._invoke(h, event, ctx))
            except Exception as e:
                if retry is None:
                    raise
                await retry.again(e, invoke)

        call: CallNext = innermost
        for m in reversed(self._chain):
            call = partial(m.handle, ctx, call)
        await call()

    async def _invoke(self, h: Handler, event: Any, ctx: Context | None) -> None:
        if ctx is not None and ctx.outbox:
            ctx.outbox.clear()  # a retried attempt publishes only what it publishes itself
        if h.is_async:
            result = await (h.func(event, ctx) if h.wants_ctx else h.func(event))
        else:
            fn = partial(h.func, event, ctx) if h.wants_ctx else partial(h.func, event)
            result = await anyio.to_thread.run_sync(fn)
        if h.publishes and result is not None:
            assert ctx is not None
            for topic in h.publishes:
                await ctx.publish(topic, result)

    async def _sub_nack(self, d: Delivery, delay: float) -> None:
        assert self._sub is not None
        if self._outboxes is not None:
            self._outboxes.pop(d, None)
        with anyio.CancelScope(shield=True):
            await self._sub.nack(d, delay)

    async def _dead_letter(self, d: Delivery, handler: str, error: Exception, reason: str) -> bool:
        msg = d.message
        if self._outboxes is not None:
            self._outboxes.pop(d, None)  # a failed handler's publishes never go out
        letter = dead_letter(
            msg,
            group=self.spec.group,
            handler=handler,
            reason=reason,
            error=error,
            attempts=d.attempt,
            first_failure_at=self._first_failure.pop(msg.id, None),
        )
        log.error(
            "dead-lettering %s from %s (group %s) to %s: %s: %s",
            msg.id, msg.topic, self.spec.group, letter.topic, reason, error,
            extra={"correlation_id": msg.correlation_id},
        )  # fmt: skip
        await self._publish_shielded(letter)  # the dead letter is stored before the ack
        self.stats.dead_lettered += 1
        return True

    def _unhandled_type(self, msg: Message) -> bool:
        return not any(h.decoder.accepts_type(msg.type) for h in self.spec.handlers)

    async def _publish_shielded(self, msg: Message) -> None:
        with anyio.CancelScope(shield=True):
            await self.app.transport.publish(msg.topic, [msg])


def _overrides(m: Middleware, hook: str) -> bool:
    return getattr(type(m), hook) is not getattr(Middleware, hook)


def _first_transactional_dedupe(chain: list[Middleware]) -> int | None:
    for i, m in enumerate(chain):
        if isinstance(m, Dedupe) and m.transactional:
            return i
    return None


def _check_order(chain: list[Middleware]) -> None:
    i = _first_transactional_dedupe(chain)
    if i is not None and any(isinstance(inner, Retry) for inner in chain[i + 1 :]):
        raise ValueError(
            "a Retry inside a transactional Dedupe would commit the writes of failed "
            "attempts; list the Retry before (outside) the Dedupe"
        )
