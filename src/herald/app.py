"""The App: register handlers with decorators, publish typed events, run the consumers.

::

    app = App("shop", broker="sqlite:///shop.db")

    @app.subscriber("orders", group="inventory")
    async def reserve_stock(event: OrderPlaced, ctx: Context) -> None:
        await ctx.publish("inventory", StockReserved(order_id=event.order_id))

    async with app:                       # connect, subscribe, start consuming
        await app.publish("orders", OrderPlaced(...), key="order-1")

``app.run()`` does the same until SIGINT/SIGTERM, then shuts down gracefully: stop fetching,
let running handlers finish (up to ``shutdown_timeout`` seconds), ack them, close. Handlers still
running after that are cancelled and their deliveries go back to the group — never lost. How
start, stop and restart work: :mod:`herald.lifecycle`.

Subscribers of one ``(topic, group)`` share a subscription and split the messages by event type
and filter. The default group is the app's name: one service, one consumer group per topic.
"""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any, Literal, TypeVar

import anyio

from herald.codec import Format, declared_version, encode_many
from herald.consumer import GroupConsumer
from herald.inbox import InboxStore, MemoryInbox
from herald.lifecycle import Lifecycle, Loop
from herald.message import (
    CONTENT_TYPE,
    CORRELATION_ID,
    OCCURRED_AT,
    SCHEMA_VERSION,
    SOURCE,
    Message,
    new_ids,
)
from herald.message import utc_now_rfc3339 as _utc_now
from herald.middleware.base import Middleware
from herald.middleware.dedupe import Dedupe
from herald.middleware.retry import DEFAULT_RETRY, Retry
from herald.scheduler import SCHEDULE_TOPIC, Scheduler, due_time, to_schedule
from herald.subscriber import Filter, GroupSpec, make_handler, mark_publisher
from herald.transports import Transport, open_transport, validate_name
from herald.transports.base import Start, check_topology

__all__ = ["App"]

F = TypeVar("F", bound=Callable[..., Any])
Hook = Callable[[], Awaitable[None]]

DEFAULT_PREFETCH = 256


class App:
    """A service that publishes and consumes events over one broker.

    :param name: the service name; sent as the ``source`` header and the default group.
    :param broker: a URL (``sqlite:///file.db``, ``memory://``, ...) or a transport object.
        Defaults to an SQLite file ``<name>.db`` in the working directory.
    :param format: ``"json"`` (default) or ``"msgpack"`` for published payloads; consumers
        decode either, by the ``content_type`` header.
    :param retry: the retry policy of every subscriber that does not set its own.
    :param middleware: wraps every handler call, first = outermost (see
        :mod:`herald.middleware`); a subscriber's own middleware runs inside these.
    :param shutdown_timeout: seconds running handlers get to finish on shutdown.
    :param cascade_limit: most causal hops a chain of ``ctx.publish`` may take; past it the
        message is dead-lettered with reason ``"cascade limit"``.
    :param max_payload: largest payload in bytes this app publishes or handles (default
        16 MiB, and never more than the transport's own limit). Publishing more raises
        ``ValueError``; a larger message arriving is dead-lettered as ``"oversized payload"``.
    :param inbox: the store ``subscriber(dedupe=True)`` uses. Default: an SQLite file beside
        an SQLite broker (``<broker>.inbox.db``), in-process for ``memory://``; other brokers
        need one given.
    :param unhandled: what to do with a message of a type no handler of the group takes:
        ``"ack"`` it (counted in ``stats.unhandled``) or ``"skip"`` it to
        ``<topic>.<group>.skipped`` and ack.
    :param scheduler: run the scheduler loop that forwards scheduled messages (``publish(...,
        delay=...)``) when they are due (:mod:`herald.scheduler`). Every App runs one by
        default and they share the work; turn it off for an App that must not consume.
    :param schedule_topic: the topic scheduled messages wait in; Apps that schedule for each
        other must use the same one.
    """

    def __init__(
        self,
        name: str,
        broker: str | Transport | None = None,
        *,
        format: Format = "json",
        retry: Retry = DEFAULT_RETRY,
        middleware: Sequence[Middleware] = (),
        shutdown_timeout: float = 30.0,
        cascade_limit: int = 64,
        unhandled: Literal["ack", "skip"] = "ack",
        inbox: InboxStore | None = None,
        max_payload: int = 16 * 1024 * 1024,
        scheduler: bool = True,
        schedule_topic: str = SCHEDULE_TOPIC,
    ) -> None:
        validate_name("app", name)
        if format not in ("json", "msgpack"):
            raise ValueError(f"format must be 'json' or 'msgpack', got {format!r}")
        if unhandled not in ("ack", "skip"):
            raise ValueError(f"unhandled must be 'ack' or 'skip', got {unhandled!r}")
        if cascade_limit < 1:
            raise ValueError("cascade_limit must be at least 1")
        self.middleware = _check_middleware(middleware)
        self.cascade_limit = cascade_limit
        self.unhandled = unhandled
        self._inbox = inbox
        if max_payload < 1:
            raise ValueError("max_payload must be at least 1 byte")
        self.name = name
        self.format: Format = format
        self.retry = retry
        self.shutdown_timeout = shutdown_timeout
        if broker is None:
            broker = f"sqlite:///{name}.db"
        self._transport = open_transport(broker) if isinstance(broker, str) else broker
        engine_limit = self._transport.features.max_payload
        self.max_payload = min(max_payload, engine_limit) if engine_limit else max_payload
        self._groups: dict[tuple[str, str], GroupSpec] = {}
        self._group_retry: dict[tuple[str, str], Retry] = {}
        self._group_middleware: dict[tuple[str, str], list[Middleware]] = {}
        self._startup: list[Hook] = []
        self._shutdown: list[Hook] = []
        self.schedule_topic = validate_name("schedule topic", schedule_topic)
        self._run_scheduler = scheduler
        self._scheduler: Scheduler | None = None
        self._lifecycle = Lifecycle(
            self, self._build_consumers, self._startup, self._shutdown, self._build_loops
        )

    # --- registration ---------------------------------------------------------------------------

    def subscriber(
        self,
        topic: str,
        *,
        group: str | None = None,
        concurrency: int = 1,
        ordered: bool = False,
        filter: Filter | None = None,
        start: Start = "earliest",
        prefetch: int | None = None,
        retry: Retry | None = None,
        middleware: Sequence[Middleware] = (),
        dedupe: bool | InboxStore | Dedupe = False,
        transactional: bool = False,
        bind: str | Sequence[str] = (),
        source: str | None = None,
    ) -> Callable[[F], F]:
        """Register the decorated function as a handler of ``topic`` in ``group``.

        :param concurrency: deliveries of this group handled at once in this process.
        :param ordered: handle one key at a time, in order (with ``concurrency`` > 1, keys are
            spread over workers; each key always goes to the same one).
        :param filter: a predicate over the :class:`~herald.Message`; messages it rejects are
            acked without running the handler (content-based routing).
        :param start: where a group seen for the first time starts: ``"earliest"`` retained
            message or ``"latest"``.
        :param prefetch: deliveries fetched per batch (default 256).
        :param retry: this group's retry policy (default: the app's).
        :param middleware: this group's middleware, inside the app's.
        :param dedupe: make the group an idempotent consumer: ``True`` (the app's inbox), an
            :class:`~herald.inbox.InboxStore`, or a configured
            :class:`~herald.middleware.dedupe.Dedupe`. It runs outside all other middleware.
        :param transactional: consume-transform-produce as one transaction: what the handler
            publishes through ``ctx.publish`` (and an ``@app.publisher`` return value) is held
            until it succeeds, then published together with the ack, atomically — all of it
            or none. Needs a transport with ``features.transactions`` (memory, SQLite, Kafka
            with a broker that has transactions); the app refuses to start otherwise.
        :param bind: a routing pattern, or several, in the engine's syntax, selecting what
            plain clients publish by address: RabbitMQ routing keys (``"order.high.*"``), a
            NATS subject (``"sensors.*.temp"``), MQTT topic filters (``"home/+/temp"``).
            What Herald publishes to ``topic`` still reaches the group.
        :param source: an existing engine object to consume as it is, competing with its
            other consumers (RabbitMQ: a queue name, e.g. one a plain producer fills through
            the default exchange). ``topic`` stays the group's name for dead letters and
            replays.

        ``bind`` and ``source`` are the contract of
        :meth:`~herald.transports.base.Transport.subscribe`; a transport whose engine cannot
        honour one raises ``ValueError`` naming it when the app starts.
        """
        validate_name("topic", topic)
        group = validate_name("group", group or self.name)
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if start not in ("earliest", "latest"):
            raise ValueError(f"start must be 'earliest' or 'latest', got {start!r}")
        if prefetch is not None and prefetch < 1:
            raise ValueError("prefetch must be at least 1")
        patterns, source = check_topology((bind,) if isinstance(bind, str) else bind, source)
        own_middleware = _check_middleware(middleware)
        if dedupe is not False:
            own_middleware.insert(0, self._dedupe(dedupe))

        def register(func: F) -> F:
            if self._started:
                raise RuntimeError("subscribers must be registered before the app starts")
            # the decorating frame's locals resolve postponed annotations of local classes
            handler = make_handler(func, filter, sys._getframe(1).f_locals)
            key = (topic, group)
            spec = self._groups.get(key)
            if spec is None:
                spec = self._groups[key] = GroupSpec(
                    topic,
                    group,
                    concurrency,
                    ordered,
                    start,
                    prefetch or DEFAULT_PREFETCH,
                    transactional,
                    patterns,
                    source,
                )
            elif (concurrency, ordered, start) != (1, False, "earliest") and (
                spec.concurrency,
                spec.ordered,
                spec.start,
            ) != (concurrency, ordered, start):
                raise ValueError(
                    f"group {group!r} on {topic!r} is already registered with other settings; "
                    "give concurrency/ordered/start on one subscriber of the group only"
                )
            elif (patterns, source) != ((), None) and (spec.bind, spec.source) != (
                patterns,
                source,
            ):
                raise ValueError(
                    f"group {group!r} on {topic!r} is already registered with other bind/source; "
                    "give them on one subscriber of the group only"
                )
            if transactional and not spec.transactional:
                raise ValueError(
                    f"group {group!r} on {topic!r}: transactional=True must be given on the "
                    "group's first subscriber"
                )
            spec.add(handler)
            if retry is not None:
                if self._group_retry.get(key, retry) != retry:
                    raise ValueError(f"group {group!r} on {topic!r} has two retry policies")
                self._group_retry[key] = retry
            if own_middleware:
                if key in self._group_middleware:
                    raise ValueError(f"group {group!r} on {topic!r} has middleware twice")
                self._group_middleware[key] = own_middleware
            return func

        return register

    def _dedupe(self, dedupe: bool | InboxStore | Dedupe) -> Dedupe:
        if isinstance(dedupe, Dedupe):
            return dedupe
        if isinstance(dedupe, InboxStore):
            return Dedupe(dedupe)
        if dedupe is not True:
            raise TypeError(f"dedupe= takes True, an InboxStore or a Dedupe, got {dedupe!r}")
        return Dedupe(self.inbox)

    @property
    def inbox(self) -> InboxStore:
        """The app's default inbox store (created on first use)."""
        if self._inbox is None:
            self._inbox = default_inbox(self._transport)
        return self._inbox

    def publisher(self, topic: str) -> Callable[[F], F]:
        """Publish the decorated handler's return value (unless ``None``) to ``topic``."""

        def mark(func: F) -> F:
            mark_publisher(func, topic)
            return func

        return mark

    def on_startup(self, hook: Hook) -> Hook:
        """Run ``hook`` after connecting, before consumers start."""
        self._startup.append(hook)
        return hook

    def on_shutdown(self, hook: Hook) -> Hook:
        """Run ``hook`` after consumers stopped, before disconnecting."""
        self._shutdown.append(hook)
        return hook

    def set_concurrency(self, concurrency: int) -> None:
        """Set every group's concurrency (``herald run --concurrency``); before start only."""
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if self._started:
            raise RuntimeError("concurrency must be set before the app starts")
        for spec in self._groups.values():
            spec.concurrency = concurrency

    @property
    def transport(self) -> Transport:
        return self._transport

    @property
    def consumers(self) -> list[GroupConsumer]:
        """The running group consumers (empty before start); each has ``.stats``."""
        return self._lifecycle.consumers

    @property
    def scheduler(self) -> Scheduler | None:
        """The running scheduler loop (``None`` before start or with ``scheduler=False``)."""
        return self._scheduler if self._lifecycle.active else None

    # --- publishing -----------------------------------------------------------------------------

    def message(
        self,
        topic: str,
        event: Any,
        *,
        key: str | None = None,
        headers: Mapping[str, str] | None = None,
        type: str | None = None,
    ) -> Message:
        """Build the envelope :meth:`publish` would send, without sending it."""
        return self._build(topic, (event,), key, headers, type)[0]

    def _build(
        self,
        topic: str,
        events: Iterable[Any],
        key: str | None,
        headers: Mapping[str, str] | None,
        type_: str | None,
    ) -> list[Message]:
        # the publish hot path: everything shared by the batch is worked out once
        if key is not None and not isinstance(key, str):
            raise TypeError(f"key must be a str or None, got {type_of(key)}")
        if headers:
            for k, v in headers.items():
                if not isinstance(k, str) or not isinstance(v, str):
                    raise TypeError(f"header {k!r}: names and values must be str, got {v!r}")
        if not isinstance(events, Sequence):
            events = list(events)
        encoded = encode_many(events, self.format)
        ids = new_ids(len(encoded))
        occurred_at, source = _utc_now(), self.name
        out = []
        limit = self.max_payload
        for event, mid, (payload, type_name, content_type) in zip(
            events, ids, encoded, strict=True
        ):
            if len(payload) > limit:
                raise ValueError(
                    f"payload of {len(payload):,} bytes for topic {topic!r} exceeds the app's "
                    f"max_payload of {limit:,} bytes"
                )
            h = {
                CORRELATION_ID: mid,
                OCCURRED_AT: occurred_at,
                SOURCE: source,
                CONTENT_TYPE: content_type,
            }
            version = _version_header(type(event))
            if version is not None:
                h[SCHEMA_VERSION] = version
            if headers:
                h.update(headers)  # the caller's headers win, schema_version included
            out.append(
                Message(
                    id=mid,
                    topic=topic,
                    payload=payload,
                    key=key,
                    type=type_ or type_name,
                    headers=h,
                )
            )
        return out

    async def publish(
        self,
        topic: str,
        event: Any,
        *,
        key: str | None = None,
        headers: Mapping[str, str] | None = None,
        type: str | None = None,
        delay: timedelta | float | None = None,
        at: datetime | None = None,
    ) -> str:
        """Publish one event; return its message id once the broker holds it durably.

        With ``delay`` (a ``timedelta`` or seconds) or ``at`` (a timezone-aware ``datetime``)
        the message is stored now and delivered to ``topic`` when due, never before
        (:mod:`herald.scheduler`); a due time already past publishes at once.

        Raises ``TypeError`` if ``event`` cannot be serialised.
        """
        due = due_time(delay, at)
        msg = self.message(topic, event, key=key, headers=headers, type=type)
        if due is None:
            await self._transport.publish(topic, [msg])
        else:
            await self._publish_scheduled([msg], due)
        return msg.id

    async def publish_many(
        self,
        topic: str,
        events: Iterable[Any],
        *,
        key: str | None = None,
        headers: Mapping[str, str] | None = None,
        type: str | None = None,
        delay: timedelta | float | None = None,
        at: datetime | None = None,
    ) -> list[str]:
        """Publish several events as one batch (one durable write where the broker allows);
        ``delay``/``at`` as for :meth:`publish`, the same due time for the whole batch."""
        due = due_time(delay, at)
        msgs = self._build(topic, events, key, headers, type)
        if not msgs:
            return []
        if due is None:
            await self._transport.publish(topic, msgs)
        else:
            await self._publish_scheduled(msgs, due)
        return [m.id for m in msgs]

    async def _publish_scheduled(self, messages: list[Message], due: float) -> None:
        out = to_schedule(messages, due, self.schedule_topic)
        await self._transport.publish(out[0].topic, out)

    # --- lifecycle (herald.lifecycle) ----------------------------------------------------------

    async def __aenter__(self) -> App:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Connect, run startup hooks, subscribe every group and start consuming.

        The consumers run in a task of the app's own, so :meth:`stop` may be called from any
        task. Raises what made the start fail, after closing what was opened; if :meth:`stop`
        is called (or, under :meth:`serve`, a signal arrives) before it finished, the start-up
        is abandoned at once and this raises :class:`~herald.lifecycle.StartAborted`. An app
        that stopped can be started again."""
        await self._lifecycle.start()

    async def stop(self) -> None:
        """Graceful shutdown: stop fetching, wait for running handlers (up to
        ``shutdown_timeout``), close. Idempotent; may be called from any task, also while
        :meth:`start` is still running (which then stops at once). Raises the error that
        stopped the app if a consumer failed while it ran."""
        await self._lifecycle.stop()

    def run(self) -> None:
        """Run until SIGINT or SIGTERM, then shut down gracefully."""
        anyio.run(self.serve)

    async def serve(self) -> None:
        """The async body of :meth:`run`: start, wait for a termination signal, stop. A
        signal during start-up stops at once, without an error."""
        await self._lifecycle.serve()

    def _build_consumers(self) -> list[GroupConsumer]:
        consumers = []
        for key, spec in self._groups.items():
            for h in spec.handlers:
                h.bind()
            middleware = [*self.middleware, *self._group_middleware.get(key, ())]
            retry = self._group_retry.get(key, self.retry)
            consumers.append(GroupConsumer(self, spec, retry, middleware))
        return consumers

    def _build_loops(self) -> list[Loop]:
        if not self._run_scheduler:
            return []
        self._scheduler = Scheduler(self._transport, self.schedule_topic)
        return [self._scheduler]

    @property
    def _started(self) -> bool:
        return self._lifecycle.active


def default_inbox(transport: Transport) -> InboxStore:
    """The inbox that goes with a transport when the app names none."""
    scheme = transport.url.split("://", 1)[0]
    if scheme == "memory":
        return MemoryInbox()
    if scheme == "sqlite":
        from herald.inbox.sqlite import SqliteInbox

        path = getattr(transport, "path", None)
        if isinstance(path, str):
            return SqliteInbox(f"{path}.inbox.db")
    raise ValueError(
        f"dedupe=True has no default inbox for {transport.url}; pass App(inbox=...) "
        "(herald.inbox: SqliteInbox, PostgresInbox, RedisInbox, MemoryInbox)"
    )


def _check_middleware(middleware: Sequence[Middleware]) -> list[Middleware]:
    items = list(middleware)
    for m in items:
        if not isinstance(m, Middleware):
            raise TypeError(f"middleware must be herald.middleware.Middleware objects, got {m!r}")
    return items


_versions: dict[type, str | None] = {}  # event class -> its schema_version header, if declared


def _version_header(cls: type) -> str | None:
    """The ``schema_version`` header for an event class (None: it declares no version)."""
    try:
        return _versions[cls]
    except KeyError:
        v = declared_version(cls)
        header = _versions[cls] = None if v is None else str(v)
        return header


def type_of(value: object) -> str:
    return type(value).__name__
